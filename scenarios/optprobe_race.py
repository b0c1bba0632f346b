"""optprobe_race: jump-optimized probes made and unmade while every CPU runs through them.

Kprobes on the instructions of bench_target and do_fork - functions every CPU executes
without pause, from bench_loop and fork_loop - and on the instructions of fork_loop that
its own loop branch lands inside the region of (the jump-target check keeps those
trap-based) are optimized and unoptimized over and over
while the loops run: the debug.kprobes-optimization sysctl is toggled, a post_handler
child joins the aggregate and leaves it (a post_handler forbids optimization), a probe is
put inside an optimized region and taken out again, a probe is disabled and enabled.
Preemption is always on (--preempt or not), and there are twice as many tasks as CPUs:
tasks are switched out in the middle of the regions and of the detour buffers, which the
optimizer must wait for (RCU tasks) before it writes a jump or frees a detour.

A sentinel probe stays on bench_target's entry the whole time: whatever state it is in -
queued, optimized, unoptimized, int3 half-written - each of the calls must be exactly one
hit or one miss.  Every loop must return what it returns unprobed, and the machine's
invariants (text, slots, hits) must hold throughout.

    python scenarios/optprobe_race.py [--arch A] [--cpus N] [--seed S] [--preempt]
        [--size ROUNDS]
"""

from __future__ import annotations

import sys
from pathlib import Path

import capstone
import trio

try:
    import smpkprobes
except ImportError:      # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smpkprobes import Kprobe, KprobeError
from smpkprobes.scenario import scenario_main

LOOPS = 40                 # bench_loop / fork_loop length per call


def where(m, func: str) -> list[int]:
    sym = m.kallsyms.lookup(func)
    return sorted(m.kprobes._insn_boundaries(sym))


async def scenario(m, report, args) -> None:
    rounds = args.size or 10
    # Always with preemption: tasks switched out in the middle of a region or a detour are
    # what the optimizer's grace periods (RCU tasks) are for.
    m.preempt = True
    k = m.kprobes
    opt = k.optimizer
    sysctl = "debug/kprobes-optimization"
    expected = {"bench_loop": await m.call("bench_loop", LOOPS),
                "fork_loop": await m.call("fork_loop", LOOPS)}

    sentinel_hits = [0]
    sentinel = Kprobe(symbol_name="bench_target",
                      pre_handler=lambda p, r: sentinel_hits.__setitem__(0, sentinel_hits[0] + 1))
    await k.register_kprobe(sentinel)
    hits: dict[int, int] = {}

    def count(p, r):
        hits[p.addr] = hits.get(p.addr, 0) + 1
    fork = []

    async def probe(addr) -> None:
        kp = Kprobe(addr=addr, pre_handler=count)
        try:
            await k.register_kprobe(kp)
        except KprobeError:
            return
        fork.append(kp)
    # do_fork: probes whose regions do not overlap, so that each may be optimized.
    nxt = 0
    for addr in where(m, "do_fork"):
        if addr < nxt:
            continue
        region = opt.region(addr) if opt.facts is not None else "trap-based"
        if not isinstance(region, str):
            nxt = region[-1].addr + region[-1].length
            await probe(addr)
    # fork_loop: probes whose region its own loop branch lands inside (decoded here, not
    # asked of the checks): the jump-target check must keep those trap-based.
    if opt.facts is not None and opt.facts.scan_function:
        sym = m.kallsyms.lookup("fork_loop")
        targets = set()
        for insn in m.backend.disassembler().disasm(k.original_text(sym.addr, sym.size),
                                                    sym.addr):
            if insn.group(capstone.CS_GRP_JUMP) and insn.operands \
                    and insn.operands[0].type == capstone.CS_OP_IMM:
                targets.add(insn.operands[0].imm)
        for addr in where(m, "fork_loop"):
            if any(addr < t < addr + opt.facts.jump_len for t in targets):
                await probe(addr)
    spots = where(m, "bench_target")
    inner_at = spots[1] if len(spots) > 2 else None

    calls = {"bench_loop": 0, "fork_loop": 0}
    wrong: list[tuple[str, int]] = []
    stop = [False]

    async def worker(cpu: int | None) -> None:
        while not stop[0]:
            for func in ("bench_loop", "fork_loop"):
                got = await m.call(func, LOOPS, cpu=cpu)
                calls[func] += 1
                if got != expected[func]:
                    wrong.append((func, got))

    seen = {"optimized": 0, "queued": 0, "unoptimized": 0}

    def look() -> None:
        s = k.statistics()
        seen["optimized"] += s.optimized
        seen["queued"] += s.optimizing
        seen["unoptimized"] += s.unoptimized

    async with trio.open_nursery() as n:
        for cpu in range(2 * m.ncpus):           # more tasks than CPUs: some wait preempted
            n.start_soon(worker, None)
        for i in range(rounds):
            await m.sleep_ns(20_000)
            look()
            post = Kprobe(symbol_name="bench_target", pre_handler=count,
                          post_handler=lambda p, r, f: None)
            await k.register_kprobe(post)            # the aggregate may not stay optimized
            look()
            await m.sleep_ns(10_000)
            await k.unregister_kprobe(post)          # ... and may again
            await m.sleep_ns(10_000)
            look()
            if inner_at is not None:
                inner = Kprobe(addr=inner_at, pre_handler=count)
                await k.register_kprobe(inner)       # a probe inside the sentinel's region
                await m.sleep_ns(10_000)
                await k.unregister_kprobe(inner)
            if fork:
                victim = fork[i % len(fork)]
                await k.disable_kprobe(victim)
                await m.sleep_ns(5_000)
                await k.enable_kprobe(victim)
            await m.sysctl.write(sysctl, "0")        # everything back to int3
            look()
            await m.sleep_ns(10_000)
            await m.sysctl.write(sysctl, "1")        # and queued again
        stop[0] = True
    await k.unregister_kprobes([sentinel, *fork])
    await opt.wait_for_kprobe_optimizer()

    bench_calls = calls["bench_loop"] * LOOPS
    report.print(f"optprobe_race: {m.ncpus} CPUs x bench_loop/fork_loop({LOOPS}), "
                 f"{rounds} rounds of sysctl toggles, post_handler children, inner probes")
    report.print(f"  calls: bench_loop {calls['bench_loop']}, fork_loop {calls['fork_loop']}; "
                 f"sentinel hits {sentinel_hits[0]} + missed {sentinel.nmissed}")
    report.print(f"  optimizer: {opt.patches} jump batches written; sampled states: "
                 f"{seen['optimized']} optimized, {seen['queued']} queued, "
                 f"{seen['unoptimized']} unoptimized")
    report.expect(not wrong, f"every loop returned its unprobed value ({wrong[:3]})")
    report.expect(sentinel_hits[0] + sentinel.nmissed == bench_calls,
                  f"the sentinel saw each of the {bench_calls} bench_target calls once "
                  f"({sentinel_hits[0]} hits + {sentinel.nmissed} missed)")
    report.expect(opt.facts is None or opt.patches > 0,
                  "jumps were written (the optimizer ran)")
    report.expect(opt.ops == {} and k.statistics().optimizing == 0,
                  "every detour was freed after the last unregister")
    report.expect(m.oopses == [], f"no oops ({len(m.oopses)} seen)")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__))

"""unregister_while_firing: batch against one-by-one unregistration while every CPU fires.

A kprobe on every instruction of do_fork and bench_target (every other one with a
post_handler, so some are boosted and some single-stepped), then, for the last phase, a
kretprobe on sleepy with calls asleep inside it and (batch mode) a jprobe on do_fork whose
handler is the guest's jdo_fork (CPUs spend long stretches inside it, printk-ing).  Each
mode (batch, then one-by-one) runs three phases:

  1. warm   every CPU runs fork_loop and bench_loop unprobed, so its translation cache
            holds the code about to be patched;
  2. arm    the probes are registered; then every CPU runs the loops once more, and every
            call must be a hit or a miss (arming reached every CPU);
  3. fire   the loops run on every CPU without pause while the probes are unregistered:
            the batch with one unregister_kprobes() call, the other mode one probe at a
            time.  Handlers note any run after their probe's unregister returned.

KPROBES.md section 2: a batch costs one grace period, not N; after unregister returns no
handler of those probes runs again, ever (nor the return handler of a kretprobe whose
calls were still asleep inside it).  CPUs that trapped just before a disarm back up and
re-execute the original instruction (stray traps), and every loop still returns the
right value.  Batch mode also registers a batch whose last probe is bad: it fails with
that probe's index and leaves nothing registered.

    python scenarios/unregister_while_firing.py [--arch A] [--cpus N] [--seed S] [--preempt]
        [--size LOOPS]
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import trio

try:
    import smpkprobes
except ImportError:      # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smpkprobes import Jprobe, Kprobe, KprobeError, Kretprobe
from smpkprobes.scenario import scenario_main

FUNCS = ("do_fork", "bench_target")
SLEEPERS = 2


def vnow(m) -> int:
    return max(c.clock for c in m.cpus)


async def probeable(m) -> list[tuple[str, int, int]]:
    """(function, address, index) of each instruction boundary of FUNCS that the arch lets
    a kprobe sit on (a trial registration asks; sparc64, say, refuses delay slots)."""
    spots = []
    for func in FUNCS:
        sym = m.kallsyms.lookup(func)
        for i, addr in enumerate(sorted(m.kprobes._insn_boundaries(sym))):
            trial = Kprobe(addr=addr)
            try:
                await m.kprobes.register_kprobe(trial)
            except KprobeError:
                continue
            await m.kprobes.unregister_kprobe(trial)
            spots.append((func, addr, i))
    return spots


def make_probes(spots, counts, late, gone):
    """A kprobe on each spot, every other one with a post_handler."""
    def pre(p, regs):
        counts[id(p)] = counts.get(id(p), 0) + 1
        if id(p) in gone:
            late.append((hex(p.addr), "pre", regs.cpu.id))
        return 0

    def post(p, regs, flags):
        if id(p) in gone:
            late.append((hex(p.addr), "post", regs.cpu.id))
    probes = []
    for func, addr, i in spots:
        probes.append((func, Kprobe(addr=addr, pre_handler=pre,
                                    post_handler=post if i % 2 else None)))
    return probes


async def one_mode(m, report, args, mode: str, spots) -> dict:
    n = args.size or 20
    counts: dict[int, int] = {}
    late: list = []
    gone: set[int] = set()
    probes = make_probes(spots, counts, late, gone)
    kps = [p for _, p in probes]

    # -- a batch that fails half-way rolls back ---------------------------------------
    if mode == "batch":
        first = [Kprobe(addr=kps[0].addr, pre_handler=lambda p, r: 0),
                 Kprobe(addr=kps[-1].addr, pre_handler=lambda p, r: 0),
                 Kprobe(symbol_name="no_such_function")]
        try:
            await m.kprobes.register_kprobes(first)
            err = None
        except KprobeError as e:
            err = e
        report.expect(err is not None and err.errno == errno.ENOENT and err.index == 2,
                      f"a batch with a bad third probe fails with ENOENT at index 2 ({err!r})")
        left = [p for p in first if p.registered]
        report.expect(not left and m.debugfs.read("kprobes/list") == "",
                      f"the failed batch left nothing registered ({len(left)} left)")

    # -- 1. warm ----------------------------------------------------------------------
    async def loops(cpu, out):
        out.append(await m.call("fork_loop", n, cpu=cpu))
        out.append(await m.call("bench_loop", n, cpu=cpu))

    warm: list[int] = []
    async with trio.open_nursery() as nursery:
        for c in range(m.ncpus):
            nursery.start_soon(loops, c, warm)

    # -- 2. arm -----------------------------------------------------------------------
    if mode == "batch":
        await m.kprobes.register_kprobes(kps)
    else:
        for p in kps:
            await m.kprobes.register_kprobe(p)
    counts.clear()
    armed: list[int] = []
    async with trio.open_nursery() as nursery:
        for c in range(m.ncpus):
            nursery.start_soon(loops, c, armed)
    # FUNCS are straight-line code, so each instruction runs once per call, except inside
    # an LL/SC retry loop (arm's atomics), which may run more: the entry runs exactly once.
    calls = m.ncpus * n
    short = [(f, hex(p.addr), counts.get(id(p), 0) + p.nmissed) for f, p in probes
             if not (counts.get(id(p), 0) + p.nmissed == calls or
                     counts.get(id(p), 0) + p.nmissed > calls and
                     p.addr != m.kallsyms_lookup_name(f))]
    report.expect(not short, f"{mode}: after registration every call hits every probe: "
                             f"hits + nmissed == {calls} entries (short: {short[:4]})")

    # -- 3. fire, and unregister meanwhile ----------------------------------------------
    rp_late: list = []
    rp_entered = trio.Event()
    entered = [0]

    def rp_entry(ri, regs):
        entered[0] += 1
        if entered[0] >= SLEEPERS:
            rp_entered.set()
        return 0

    def rp_handler(ri, regs):
        if rp_gone[0]:
            rp_late.append(regs.cpu.id)

    rp_gone = [False]
    rp = Kretprobe(symbol_name="sleepy", handler=rp_handler, entry_handler=rp_entry,
                   maxactive=SLEEPERS + m.ncpus)
    await m.kprobes.register_kretprobe(rp)
    # Batch mode only: CPUs inside jdo_fork stretch every grace period.
    jp = Jprobe("jdo_fork", symbol_name="do_fork")
    if mode == "batch":
        await m.kprobes.register_jprobe(jp)
    fired, after = trio.Event(), trio.Event()
    total = [0]
    stop = [False]
    target = [m.ncpus, None]            # rounds before unregistering; rounds to go on after
    results: list[tuple[str, int, int]] = []

    async def firing(cpu):
        while not stop[0]:
            results.append(("fork_loop", n, await m.call("fork_loop", n, cpu=cpu)))
            results.append(("bench_loop", n * n, await m.call("bench_loop", n, cpu=cpu)))
            total[0] += 1
            if total[0] >= target[0]:
                fired.set()
            if target[1] is not None and total[0] >= target[1]:
                after.set()

    async def sleeper():
        results.append(("sleepy", 1, await m.call("sleepy", 1)))

    st0 = m.statistics()
    async with trio.open_nursery() as nursery:
        # Firing first: with every CPU busy, virtual time cannot jump to the sleepers'
        # wake-up before the probes are gone.
        for c in range(m.ncpus):
            nursery.start_soon(firing, c)
        for _ in range(SLEEPERS):
            nursery.start_soon(sleeper)
        await rp_entered.wait()
        await fired.wait()
        st1, t0 = m.statistics(), vnow(m)
        if mode == "batch":
            await m.kprobes.unregister_kprobes(kps)
            gone.update(id(p) for p in kps)
        else:
            for p in kps:
                await m.kprobes.unregister_kprobe(p)
                gone.add(id(p))
        st2, t1 = m.statistics(), vnow(m)
        await m.kprobes.unregister_kretprobe(rp)
        rp_gone[0] = True
        if mode == "batch":
            await m.kprobes.unregister_jprobe(jp)
        # Keep firing a while after the last unregister: stale hits would show now.
        target[1] = total[0] + m.ncpus
        await after.wait()
        stop[0] = True
    st3 = m.statistics()

    wrong = [r for r in results if r[1] != r[2]]
    report.expect(not wrong, f"{mode}: every loop returned the right value under removal "
                             f"({len(results)} calls, wrong: {wrong[:3]})")
    report.expect(sorted(warm) == sorted(armed) == sorted([n, n * n] * m.ncpus),
                  f"{mode}: probed and unprobed loops return the same ({warm} / {armed})")
    report.expect(not late, f"{mode}: no kprobe handler ran after its unregister returned "
                            f"({len(late)} did: {late[:3]})")
    report.expect(not rp_late, f"{mode}: no kretprobe handler ran after unregister_kretprobe "
                               f"returned ({len(rp_late)} did)")
    report.expect(all(not p.registered for p in kps) and not rp.kp.registered
                  and not jp.kp.registered and m.debugfs.read("kprobes/list") == "",
                  f"{mode}: nothing is left registered")
    gps = st2.grace_periods - st1.grace_periods
    want = 1 if mode == "batch" else len(kps)
    report.expect(gps == want, f"{mode}: unregistering {len(kps)} probes took {want} grace "
                               f"period(s) (took {gps})")
    return {"mode": mode, "probes": len(kps), "gps": gps,
            "strays": st3.stray_traps - st0.stray_traps,
            "syncs": st2.text_syncs - st1.text_syncs,
            "time": t1 - t0, "late": len(late) + len(rp_late),
            "hits": sum(counts.values())}


async def scenario(m, report, args) -> None:
    spots = await probeable(m)
    rows = [await one_mode(m, report, args, "batch", spots),
            await one_mode(m, report, args, "one-by-one", spots)]
    report.print(f"unregister_while_firing: {m.ncpus} CPUs firing fork_loop/bench_loop "
                 f"({args.size or 20} iterations per call) while the probes go")
    report.print(f"  {'mode':<11} {'probes':>6} {'grace periods':>13} {'text syncs':>10} "
                 f"{'stray traps':>11} {'unregister time':>15} {'late handlers':>13}")
    for r in rows:
        report.print(f"  {r['mode']:<11} {r['probes']:>6} {r['gps']:>13} {r['syncs']:>10} "
                     f"{r['strays']:>11} {r['time'] / 1000:>12.1f} us {r['late']:>13}")
    batch, single = rows
    report.print(f"  batch: one grace period for {batch['probes']} probes; one-by-one: "
                 f"{single['gps']}; unregistering took "
                 f"{single['time'] / max(batch['time'], 1):.1f}x the batch's virtual time")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__))

"""reentrancy: handlers that call probed functions, and the resulting nmissed.

Kprobes never run a probe's handlers from inside another probe's handlers on the same CPU:
the inner hit is counted in the inner probe's nmissed, single-stepped in state REENTER,
and the outer probe's state (saved in prev_kprobe) comes back afterwards.  Three cases run
on every CPU at once:

  self      lib/test_kprobes.c's test_kprobe_missed: a probe on kprobe_recursed_target
            whose pre and post handlers both call kprobe_recursed_target (2 misses a hit);
  other     a probe on kprobe_target whose pre_handler calls kprobe_target2, itself
            probed: kprobe_target2's probe misses (its handler never runs from there);
  return    a kretprobe on kprobe_target2 whose return handler calls kprobe_target:
            kprobe_target's probe misses inside it.

Expectations: the exact hits and nmissed of each probe, every call returning what it
returns unprobed, and each CPU's control block idle at the end.

    python scenarios/reentrancy.py [--arch A] [--cpus N] [--seed S] [--preempt]
        [--size CALLS_PER_CPU]
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

try:
    import smpkprobes
except ImportError:      # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smpkprobes import Kprobe, Kretprobe
from smpkprobes.scenario import scenario_main


async def scenario(m, report, args) -> None:
    n = args.size or 40
    expected = {f: await m.call(f, *a) for f, a in
                (("kprobe_recursed_target", ()), ("kprobe_target", (30,)),
                 ("kprobe_target2", (30,)))}
    hits = {"self": 0, "target": 0, "target2": 0, "ret": 0}
    inner: list[int] = []

    def count(key):
        def handler(*_):
            hits[key] += 1
            return 0
        return handler

    selfp = Kprobe(symbol_name="kprobe_recursed_target",
                   pre_handler=lambda p, r: (count("self")(), r.cpu.call("kprobe_recursed_target"))
                   and 0,
                   post_handler=lambda p, r, f: r.cpu.call("kprobe_recursed_target"))

    def target_pre(p, regs):
        hits["target"] += 1
        inner.append(regs.cpu.call("kprobe_target2", 30))
        return 0

    target = Kprobe(symbol_name="kprobe_target", pre_handler=target_pre)
    target2 = Kprobe(symbol_name="kprobe_target2", pre_handler=count("target2"))

    def ret_handler(ri, regs):
        hits["ret"] += 1
        inner.append(regs.cpu.call("kprobe_target", 30))

    rp = Kretprobe(symbol_name="kprobe_target2", handler=ret_handler, maxactive=4 * m.ncpus)
    await m.kprobes.register_kprobes([selfp, target, target2])
    await m.kprobes.register_kretprobe(rp)

    results: list[tuple[str, int]] = []

    async def run(cpu):
        for _ in range(n):
            results.append(("kprobe_recursed_target", await m.call("kprobe_recursed_target",
                                                                   cpu=cpu)))
            results.append(("kprobe_target", await m.call("kprobe_target", 30, cpu=cpu)))
            results.append(("kprobe_target2", await m.call("kprobe_target2", 30, cpu=cpu)))

    async with trio.open_nursery() as nursery:
        for c in range(m.ncpus):
            nursery.start_soon(run, c)
    await m.kprobes.unregister_kretprobe(rp)
    await m.kprobes.unregister_kprobes([selfp, target, target2])

    calls = n * m.ncpus
    report.print(f"reentrancy: {m.ncpus} CPUs x {n} calls of each target; handlers call "
                 f"probed functions")
    report.print(f"  {'probe':<40} {'hits':>6} {'nmissed':>8}   expected")
    rows = [
        ("kprobe_recursed_target (self)", hits["self"], selfp.nmissed, (calls, 2 * calls)),
        ("kprobe_target (calls target2)", hits["target"], target.nmissed, (calls, calls)),
        ("kprobe_target2", hits["target2"], target2.nmissed, (calls, calls)),
        ("kretprobe kprobe_target2 (calls target)", hits["ret"], rp.kp.nmissed, (calls, calls)),
    ]
    for name, h, missed, want in rows:
        report.print(f"  {name:<40} {h:>6} {missed:>8}   {want[0]} / {want[1]}")
    report.print(f"  kprobe_target's probe: {calls} direct calls hit, {target.nmissed} calls "
                 f"from the return handler missed; kprobe_target2's: {calls} direct hits, "
                 f"{target2.nmissed} misses from kprobe_target's pre_handler")
    report.expect((hits["self"], selfp.nmissed) == (calls, 2 * calls),
                  f"test_kprobe_missed on every CPU: {calls} hits, nmissed {2 * calls} "
                  f"(got {hits['self']}, {selfp.nmissed})")
    # kprobe_target: hit by each direct call; missed by each call from the return handler
    # (one per direct kprobe_target2 call).  kprobe_target2: hit by each direct call,
    # missed by each call from kprobe_target's pre_handler.
    report.expect((hits["target"], target.nmissed) == (calls, calls),
                  f"kprobe_target: {calls} hits and {calls} misses "
                  f"(got {hits['target']}, {target.nmissed})")
    report.expect((hits["target2"], target2.nmissed) == (calls, calls),
                  f"kprobe_target2: {calls} hits and {calls} misses "
                  f"(got {hits['target2']}, {target2.nmissed})")
    report.expect(rp.kp.nmissed == calls, f"the kretprobe shares kprobe_target2's address, "
                                          f"so it misses with it ({rp.kp.nmissed})")
    report.expect(hits["ret"] == calls and rp.nmissed == 0,
                  f"the return handler ran once per direct kprobe_target2 call "
                  f"({hits['ret']}, pool misses {rp.nmissed})")
    wrong = [(f, r) for f, r in results if r != expected[f]]
    report.expect(not wrong, f"every call returned what it returns unprobed ({wrong[:3]})")
    report.expect(sorted(set(inner)) == sorted({expected["kprobe_target"],
                                                expected["kprobe_target2"]}),
                  f"calls made from handlers returned right ({sorted(set(inner))})")
    kcbs = m.kprobes.kprobe_ctlblk
    report.expect(all(kcbs[c.id].current_kprobe is None and kcbs[c.id].prev_kprobe is None
                      and c.preempt_count == 0 for c in m.cpus),
                  "every control block is idle afterwards")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__))

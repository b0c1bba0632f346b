"""The `smpkprobes` command: demo, run, list, stress, selftest, trace, bench."""

from __future__ import annotations

import argparse
import functools
import runpy
import sys
from pathlib import Path

import trio

from . import _bench
from ._harness import scenarios_dir
from .._system import Machine

SCENARIOS = scenarios_dir()


async def demo(arch: str = "x86_64", cpus: int = 4, seed: int = 1, preempt: bool = False) -> int:
    """Boot a machine, run fork_loop, sleepy and fib concurrently on every CPU, summarise."""
    from ..kprobes._core import Kprobe
    async with Machine(arch=arch, cpus=cpus, seed=seed, preempt=preempt) as m:
        hits = [0] * cpus
        kp = Kprobe(symbol_name="do_fork",
                    pre_handler=lambda p, regs: hits.__setitem__(regs.cpu.id, hits[regs.cpu.id] + 1))
        await m.kprobes.register_kprobe(kp)
        results = {}

        async def one(func, arg, cpu):
            results[(func, cpu)] = await m.call(func, arg, cpu=cpu)

        async with trio.open_nursery() as n:
            for c in range(cpus):
                n.start_soon(one, "fork_loop", 200, c)
                n.start_soon(one, "sleepy", 2 + c, c)
                n.start_soon(one, "fib", 12, c)
        await m.call("printk_test", 42)
        print(m.debugfs.read("kprobes/list"), end="")
        await m.kprobes.unregister_kprobe(kp)
        st = m.statistics()
        print(f"smpkprobes demo: {arch}, {cpus} CPUs, seed {seed}, preempt={preempt}")
        print(f"{'cpu':>4} {'instructions':>13} {'tasks':>6} {'do_fork hits':>13}")
        for c in m.cpus:
            print(f"{c.id:>4} {c.instructions:>13,} {c.tasks_run:>6} {hits[c.id]:>13}")
        print(f"total: {st.instructions:,} instructions in {st.quanta:,} quanta, "
              f"{st.tasks} tasks, {st.grace_periods} grace period(s), {st.text_syncs} text syncs")
        for (func, cpu), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            print(f"  cpu{cpu}: {func} -> {r}")
        print("printk:")
        for line in m.printk_log:
            print(f"  {line}")
        print(f"trace digest: {m.trace_digest()}")
        ok = sum(hits) == 200 * cpus and not m.oopses
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """The command line; bad input (an unknown or unsupported arch, a bad probe definition)
    is one line on stderr and exit status 2, not a traceback."""
    from smpkprobes.cpus import UnsupportedArchError

    from .._errors import KprobeError
    try:
        return _main(argv)
    except (UnsupportedArchError, KprobeError) as err:
        print(f"smpkprobes: error: {err}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="smpkprobes", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job: a 4-CPU machine with a probe, summarised")
    for p in (d,):
        p.add_argument("--arch", default="x86_64")
        p.add_argument("--cpus", type=int, default=4)
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--preempt", action="store_true")
    b = sub.add_parser("bench", help="benchmarks: machine throughput, kprobe hit cost")
    b.add_argument("what", nargs="?", default="all",
                   choices=["all", "machine", "kprobe", "overhead", "memory"])
    b.add_argument("--quick", action="store_true", help="smaller runs")
    b.add_argument("--arch", action="append", help="overhead table for this arch only "
                   "(repeatable; default: every available arch)")
    r = sub.add_parser("run", help="run a scenario from scenarios/")
    r.add_argument("scenario")
    r.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("list", help="list the scenarios")
    s = sub.add_parser("stress", help="run a scenario over many seeds; replay and shrink failures",
                       description="Run SCENARIO once per seed in A:B (flags this command does "
                                   "not know go to the scenario, e.g. --cpus 8 --preempt "
                                   "--schedule pct --mutant NAME).  Prints a replay command for "
                                   "every failing seed and a shrunk schedule per kind of failure.")
    s.add_argument("scenario")
    s.add_argument("--seeds", default="0:100", metavar="A:B", help="seeds A..B-1 (default 0:100)")
    s.add_argument("--jobs", type=int, default=1, help="parallel processes (default 1)")
    s.add_argument("--timeout", type=float, default=120.0,
                   help="wall-clock seconds before a run counts as hung (default 120)")
    s.add_argument("--no-shrink", action="store_true", help="do not shrink failing schedules")
    s.add_argument("--shrink-runs", type=int, default=120,
                   help="most replays spent shrinking one failure (default 120)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    st = sub.add_parser("selftest", help="check the checkers: the mutation table, invariant cost")
    st.add_argument("--mutants", action="store_true",
                    help="inject each known probe-core bug; show which seed catches it")
    st.add_argument("--only", nargs="+", metavar="MUTANT", help="just these mutants")
    st.add_argument("--max-seeds", type=int, default=20, help="seeds per mutant (default 20)")
    st.add_argument("--jobs", type=int, default=1)
    st.add_argument("--first", action="store_true",
                    help="stop each mutant at its first failing seed (no detection rate)")
    st.add_argument("--invariant-cost", action="store_true",
                    help="time a hit-heavy run with the invariant checks on and off")
    t = sub.add_parser("trace", help="kprobe_events one-liners: define, enable, run, print lines",
                       description="Define kprobe events in the kernel's kprobe_events "
                                   "language, run workloads on every CPU and print each trace "
                                   "line as it is recorded.  Example: smpkprobes trace "
                                   "'p:myfork do_fork flags=$arg1:x64' 'r:openret do_sys_open "
                                   "ret=$retval:s32' --workload fork_loop,open_loop --cpus 4")
    t.add_argument("definitions", nargs="+", metavar="DEFINITION",
                   help="p[:[GRP/]EVENT] SYMBOL[+offs]|ADDR [FETCHARGS] or "
                        "r[MAXACTIVE][:[GRP/]EVENT] SYMBOL[+0] [FETCHARGS]")
    t.add_argument("--workload", default="fork_loop", metavar="F[:ARG...],...",
                   help="guest functions to run on every CPU (default fork_loop)")
    t.add_argument("--loops", type=int, default=5, help="iterations of the loop workloads")
    t.add_argument("--arch", default="x86_64")
    t.add_argument("--cpus", type=int, default=4)
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--preempt", action="store_true")
    t.add_argument("--perfetto", metavar="FILE", help="also write the machine's event trace")
    t.add_argument("--plot", metavar="FILE", help="also draw the per-CPU timeline")
    a, rest = ap.parse_known_args(argv)
    if rest and a.cmd != "stress":
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if a.cmd == "demo":
        return trio.run(functools.partial(demo, a.arch, a.cpus, a.seed, a.preempt))
    if a.cmd == "bench":
        return _bench.main(a.what, quick=a.quick, arches=a.arch)
    if a.cmd == "trace":
        return _trace(a)
    if a.cmd == "list":
        from . import _stress
        for name in _stress.scenario_names():
            print(f"{name:<26} {_stress.describe(name)}")
        return 0
    if a.cmd == "stress":
        return _stress_cmd(a, rest)
    if a.cmd == "selftest":
        return _selftest(a)
    if a.cmd == "run":
        path = SCENARIOS / f"{a.scenario}.py"
        if not path.exists():
            print(f"no scenario {a.scenario!r}; see `smpkprobes list`", file=sys.stderr)
            return 2
        sys.argv = [str(path), *a.args]
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as e:
            return int(e.code or 0)
        return 0
    return 2


def _stress_cmd(a, rest: list[str]) -> int:
    from . import _stress
    try:
        seeds = _stress.parse_seeds(a.seeds)
        return _stress.stress_main(a.scenario, seeds, rest, jobs=a.jobs, timeout=a.timeout,
                                   do_shrink=not a.no_shrink, shrink_runs=a.shrink_runs,
                                   progress=not a.no_progress)
    except (LookupError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _selftest(a) -> int:
    from . import _stress
    if not (a.mutants or a.invariant_cost):
        a.mutants = a.invariant_cost = True
    status = 0
    if a.invariant_cost:
        c = _stress.invariant_cost()
        print(f"invariant checks: {c['off'] * 1e3:.0f} ms without, {c['on'] * 1e3:.0f} ms with "
              f"({c['overhead']:+.1%}) for {c['hits']:,} hits in {c['quanta']:,} quanta on 4 "
              f"CPUs (best of 5); same run with and without: {c['same_run']}")
    if a.mutants:
        results = _stress.mutation_check(a.max_seeds, a.jobs, a.only, rate=not a.first)
        _stress.print_mutation_table(results, a.max_seeds)
        status = 0 if all(r.caught for r in results) else 1
    return status


def _trace(a) -> int:
    from . import _trace_export
    from ..kprobes import _tracefs
    try:
        workloads = _tracefs.parse_workloads(a.workload, a.loops)
        if a.plot:
            _trace_export.require_matplotlib()
    except (ValueError, _trace_export.PlotUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log = functools.partial(print, file=sys.stderr)
    after = functools.partial(_trace_export.export_all, perfetto=a.perfetto, plot=a.plot, log=log)
    return trio.run(functools.partial(
        _tracefs.trace_session, a.definitions, workloads, arch=a.arch, cpus=a.cpus, seed=a.seed,
        preempt=a.preempt, out=functools.partial(print, flush=True), err=log, after=after))


if __name__ == "__main__":
    sys.exit(main())

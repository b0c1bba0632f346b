"""The `smpkprobes` command: demo, run, list, bench."""

from __future__ import annotations

import argparse
import functools
import runpy
import sys
from pathlib import Path

import trio

from . import _bench
from ._system import Machine

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


async def demo(arch: str = "x86_64", cpus: int = 4, seed: int = 1, preempt: bool = False) -> int:
    """Boot a machine, run fork_loop, sleepy and fib concurrently on every CPU, summarise."""
    from ._kprobes import Kprobe
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
    ap = argparse.ArgumentParser(prog="smpkprobes", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job: a 4-CPU machine with a probe, summarised")
    for p in (d,):
        p.add_argument("--arch", default="x86_64")
        p.add_argument("--cpus", type=int, default=4)
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--preempt", action="store_true")
    b = sub.add_parser("bench", help="benchmarks: machine throughput, kprobe hit cost")
    b.add_argument("what", nargs="?", default="all", choices=["all", "machine", "kprobe"])
    b.add_argument("--quick", action="store_true", help="smaller runs")
    r = sub.add_parser("run", help="run a scenario from scenarios/")
    r.add_argument("scenario")
    r.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("list", help="list the scenarios")
    a = ap.parse_args(argv)
    if a.cmd == "demo":
        return trio.run(functools.partial(demo, a.arch, a.cpus, a.seed, a.preempt))
    if a.cmd == "bench":
        return _bench.main(a.what, quick=a.quick)
    if a.cmd == "list":
        for p in sorted(SCENARIOS.glob("*.py")):
            print(p.stem)
        return 0
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


if __name__ == "__main__":
    sys.exit(main())

"""maxactive_contention: the kretprobe instance pool under contention, as a table of nmissed.

A kretprobe on do_fork, a non-sleeping, non-recursive function, with two tasks per CPU
calling fork_loop, swept over maxactive x CPUs x preempt (each cell is its own machine,
same seed).  Then the two cases the rule excludes, at maxactive = NR_CPUS: a sleeping
function (sleepy, three callers per CPU) and a recursive one (fib).

What KPROBES.md section 1 (and the 2.6.25 kprobes document) says, checked here:
  * the default maxactive is NR_CPUS without preemption and max(10, 2*NR_CPUS) with it;
  * without preemption, NR_CPUS instances suffice for a non-sleeping, non-recursive
    function: at most one call per CPU can be inside it, so nmissed is 0 (and so with the
    default);
  * a hit that finds the pool empty counts one miss and nothing else: instances taken +
    nmissed == calls (counted by the guest's pid counter), and every instance is back in
    the pool afterwards;
  * a sleeping or recursive function can need more than NR_CPUS: there nmissed > 0.

    python scenarios/maxactive_contention.py [--arch A] [--cpus N] [--seed S] [--preempt]
        [--size LOOPS]
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

try:
    import smpkprobes
except ImportError:      # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smpkprobes import Kretprobe, Machine
from smpkprobes.scenario import machine_options, scenario_main

TASKS_PER_CPU = 2


def last_pid(m) -> int:
    addr = m.kallsyms_lookup_name("last_pid")
    return int.from_bytes(m.read_memory(addr, m.backend.word_bytes), m.backend.endian,
                          signed=True)


async def contend(m, func: str, fargs: tuple, tasks_per_cpu: int, maxactive: int) -> dict:
    """Run `func(*fargs)` `tasks_per_cpu` times per CPU under a kretprobe on `probe`."""
    probe = {"fork_loop": "do_fork"}.get(func, func)
    returns = [0]
    rp = Kretprobe(symbol_name=probe, maxactive=maxactive,
                   handler=lambda ri, regs: returns.__setitem__(0, returns[0] + 1))
    await m.kprobes.register_kretprobe(rp)
    pid0 = last_pid(m)
    results = []

    async def one(cpu):
        results.append(await m.call(func, *fargs, cpu=cpu))

    async with trio.open_nursery() as nursery:
        for c in range(m.ncpus):
            for _ in range(tasks_per_cpu):
                nursery.start_soon(one, c)
    st = rp.statistics()
    await m.kprobes.unregister_kretprobe(rp)
    return {"maxactive": rp.maxactive, "nmissed": rp.nmissed, "taken": st.taken,
            "free": st.free, "in_use": st.in_use, "high": st.high_water, "returns": returns[0],
            "forks": last_pid(m) - pid0, "results": results}


async def scenario(m, report, args) -> None:
    n = args.size or 60
    # The main machine runs the configuration of the command line; the sweep boots its own
    # machines, with the same schedule policy (a --replay schedule is the main machine's).
    opts = {**machine_options(args), "conductor": args.schedule}
    cpus_axis = sorted({1, 2, m.ncpus})
    actives = sorted({1, 2, m.ncpus, 2 * m.ncpus}) + [0]
    table: dict[tuple[bool, int, int], dict] = {}
    invariant_notes: list[str] = []
    for preempt in (False, True):
        for ncpus in cpus_axis:
            for maxactive in actives:
                if (preempt, ncpus) == (m.preempt, m.ncpus) and maxactive == m.ncpus:
                    cell = await contend(m, "fork_loop", (n,), TASKS_PER_CPU, maxactive)
                else:
                    mm = Machine(arch=m.arch, cpus=ncpus, seed=m.seed, preempt=preempt,
                                 invariants="record", **opts)
                    async with mm:
                        cell = await contend(mm, "fork_loop", (n,), TASKS_PER_CPU, maxactive)
                    invariant_notes += mm.invariants.violations
                    report.expect(not mm.oopses, f"no oops in the sweep ({mm.oopses[:1]})")
                table[(preempt, ncpus, maxactive)] = cell
    # What `--plot FILE` draws: nmissed against maxactive, one curve per CPU count.
    report.plot = dict(
        curves={f"{c} CPU{'s' if c > 1 else ''}{', preempt' if pre else ''}":
                [(a, table[(pre, c, a)]["nmissed"]) for a in actives if a]
                for pre in (False, True) for c in cpus_axis},
        xlabel="maxactive", ylabel="nmissed", logx=True,
        title=f"kretprobe on do_fork: {TASKS_PER_CPU} tasks per CPU x fork_loop({n})")

    report.print(f"maxactive_contention: kretprobe on do_fork, {TASKS_PER_CPU} tasks per CPU "
                 f"x fork_loop({n}); nmissed by maxactive (0 = the default)")
    head = "".join(f"{a if a else 'dflt':>7}" for a in actives)
    report.print(f"  {'preempt':<8} {'CPUs':>4} {head}   default is")
    for preempt in (False, True):
        for ncpus in cpus_axis:
            row = "".join(f"{table[(preempt, ncpus, a)]['nmissed']:>7}" for a in actives)
            report.print(f"  {'yes' if preempt else 'no':<8} {ncpus:>4} {row}   "
                         f"{table[(preempt, ncpus, 0)]['maxactive']}")

    for (preempt, ncpus, maxactive), c in table.items():
        where = f"preempt={preempt}, {ncpus} CPUs, maxactive {maxactive or 'default'}"
        calls = ncpus * TASKS_PER_CPU * n
        report.expect(c["taken"] + c["nmissed"] == c["forks"] == calls,
                      f"{where}: taken {c['taken']} + nmissed {c['nmissed']} == "
                      f"{c['forks']} calls")
        report.expect(c["free"] == c["maxactive"] and c["in_use"] == 0,
                      f"{where}: every instance back in the pool ({c['free']} free)")
        report.expect(c["returns"] == c["taken"], f"{where}: one return handler per instance "
                                                  f"({c['returns']} vs {c['taken']})")
        report.expect(c["results"] == [n] * ncpus * TASKS_PER_CPU,
                      f"{where}: fork_loop returned {n} everywhere")
        if maxactive == 0:
            want = max(10, 2 * ncpus) if preempt else ncpus
            report.expect(c["maxactive"] == want, f"{where}: the default maxactive is "
                                                  f"{want} (got {c['maxactive']})")
        if not preempt and maxactive in (0, ncpus):
            report.expect(c["nmissed"] == 0, f"{where}: NR_CPUS instances suffice for a "
                                             f"non-sleeping, non-recursive function "
                                             f"(nmissed {c['nmissed']})")

    # The cases the rule excludes, on the main machine, at maxactive = NR_CPUS.
    sleeping = await contend(m, "sleepy", (1,), 3, m.ncpus)
    depth = m.ncpus + 2                 # fib(k) nests k - 1 calls deep: more than NR_CPUS
    recursive = await contend(m, "fib", (depth,), 1, m.ncpus)
    report.print(f"  at maxactive = NR_CPUS = {m.ncpus}: sleepy(1) x 3 per CPU nmissed "
                 f"{sleeping['nmissed']} (high water {sleeping['high']}), fib({depth}) per CPU "
                 f"nmissed {recursive['nmissed']} (high water {recursive['high']})")
    report.expect(sleeping["nmissed"] > 0, "a sleeping function, called by more tasks than "
                                           "CPUs, needs more than NR_CPUS instances")
    report.expect(recursive["nmissed"] > 0, "a function recursing deeper than NR_CPUS needs "
                                            "more than NR_CPUS instances")
    fib = [0, 1]
    while len(fib) <= depth:
        fib.append(fib[-1] + fib[-2])
    report.expect(sleeping["results"] == [1] * 3 * m.ncpus and
                  recursive["results"] == [fib[depth]] * m.ncpus, "sleepy and fib returned right")
    for v in invariant_notes:
        report.expect(False, f"invariant (sweep machine) {v}")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__))

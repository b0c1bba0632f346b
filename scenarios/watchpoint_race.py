"""Hardware breakpoints while every CPU writes the watched word.

Wide: every CPU writes watched_counter (do_fork writes it) while the host registers and
unregisters a wide write breakpoint on it, --size rounds (default 4), with a
fork_schedule_loop call of its own in between.  Even CPUs run fork_loop pinned to them (a
running task: installs and removals reach them by IPI), odd ones fork_schedule_loop (do_fork,
then yield: the host's own call gets a CPU there).  Each install and
removal reaches the other CPUs by cross-CPU calls, late by up to two quanta.  Per round, the
triggered calls must lie between the writes made while every CPU surely held the breakpoint
and the writes made from the start of registering to the end of unregistering (last_pid
counts the writes; one in flight per CPU is allowed at each edge), and no handler may run
after the unregister returned.

Per task: tasks running fork_schedule_loop (do_fork, then schedule()) migrate between CPUs
with a per-task breakpoint each.  Its slot moves with its task at every context switch, so it
triggers exactly once per write of that task, never for another task's writes.

    python scenarios/watchpoint_race.py [--arch A] [--cpus N] [--seed S] [--preempt] [--size R]
"""

from __future__ import annotations

import sys
from pathlib import Path


try:
    import smpkprobes
except ImportError:      # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import smpkprobes
from smpkprobes.scenario import scenario_main

CALLS = 3000             # writes per CPU: outlasts the rounds
TASK_LOOPS = 40


def read_word(m, name: str) -> int:
    w = m.backend.word_bytes
    return int.from_bytes(m.read_memory(m.kallsyms_lookup_name(name), w), m.backend.endian)


async def scenario(m, report, args) -> None:
    hw = m.hw_breakpoints
    if hw.facts.unsupported:
        report.print(f"{m.arch}: {hw.facts.unsupported}")
        return
    rounds = args.size or 4
    attr = smpkprobes.HwBreakpointAttr(symbol_name="watched_counter",
                                       bp_len=m.backend.word_bytes, bp_type="w")
    writers = [m.spawn("fork_loop" if c % 2 == 0 else "fork_schedule_loop", CALLS, cpu=c)
               for c in range(m.ncpus)]

    # -- wide breakpoints, registered and unregistered under the writers ----------------------
    late = []
    report.print(f"watchpoint_race: {m.ncpus} CPUs writing watched_counter, {rounds} rounds of "
                 f"register/unregister_wide_hw_breakpoint")
    report.print(f"  {'round':>5} {'writes (all held)':>17} {'triggered':>9} "
                 f"{'writes (any held)':>17}")
    for r in range(rounds):
        gone = []

        def triggered(bp, data, regs, gone=gone):
            if gone:
                late.append((data.cpu, r))
        w0 = read_word(m, "last_pid")
        h = await hw.register_wide_hw_breakpoint(attr, triggered)
        w1 = read_word(m, "last_pid")
        await m.call("fork_schedule_loop", 20 * (r + 1))
        w2 = read_word(m, "last_pid")
        await hw.unregister_wide_hw_breakpoint(h)
        gone.append(True)
        w3 = read_word(m, "last_pid")
        report.print(f"  {r:>5} {w2 - w1:>17} {h.hits:>9} {w3 - w0:>17}")
        report.expect(w2 - w1 - m.ncpus <= h.hits <= w3 - w0 + m.ncpus,
                      f"round {r}: triggered calls {h.hits} within the writes made while every "
                      f"CPU held the breakpoint ({w2 - w1}) and while any could ({w3 - w0})")
    report.expect(not late, f"no handler runs after unregister_wide_hw_breakpoint returns "
                            f"(got {len(late)})")

    # -- per-task breakpoints on migrating tasks --------------------------------------------
    tasks = [m.spawn("fork_schedule_loop", TASK_LOOPS) for _ in range(m.ncpus)]
    foreign = []
    bps = []
    for task in tasks:
        def triggered(bp, data, regs, task=task):
            if regs.cpu.current is not task:
                foreign.append((task.pid, data.cpu))
        bps.append(await hw.register_user_hw_breakpoint(attr, triggered, task))
    for task in tasks:
        await task.wait()
    for w in writers:
        await w.wait()
    hits = [bp.hits for bp in bps]
    moves = sum(t.migrations for t in tasks)
    report.print(f"  per task: {len(tasks)} tasks x {TASK_LOOPS} writes, {moves} migrations, "
                 f"triggered {hits}")
    for bp in bps:
        await hw.unregister_hw_breakpoint(bp)
    # Migration is what this part exercises, and the random policy always gives some; PCT's
    # fixed priorities may keep every task on its CPU, which is no bug.
    if args.schedule == "random":
        report.expect(moves > 0 or m.ncpus == 1, "the tasks migrate between CPUs")
    report.expect(hits == [TASK_LOOPS] * len(tasks),
                  f"each per-task breakpoint triggers once per write of its task, on whichever "
                  f"CPU it runs ({TASK_LOOPS} each, got {hits})")
    report.expect(not foreign, f"no per-task breakpoint triggers for another task's write "
                               f"(got {foreign[:4]})")
    report.expect(not hw.stale_triggers and not hw.warnings,
                  f"no stale trigger, no slot warning ({hw.stale_triggers[:2]}, "
                  f"{hw.warnings[:2]})")
    held = [hw.installed(c) for c in range(m.ncpus)]
    report.expect(held == [[]] * m.ncpus, f"every debug register is free at the end ({held})")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__))

"""fault_injection: a pre_handler that makes do_sys_open fail with -ENOMEM.

"Don't drink and probe": a pre_handler that returns non-zero has changed the registers
itself, and kprobes resumes where it left them, without single-stepping (KPROBES.md
section 3).  Here the pre_handler on do_sys_open sets the return value to -ENOMEM and
emulates a return (through the arch's calling convention, so the script is the same on
every arch), on every third call each CPU makes; the others go through untouched.

Every CPU runs open_loop (which counts failed opens) at once.  Expectations: each
open_loop counts exactly the injected failures, do_sys_open's body never ran for an
injected call (the guest's own open counter says so), a direct call sees -ENOMEM (-12)
where it would see -ENOENT (-2), and after unregistering everything opens again.

    python scenarios/fault_injection.py [--arch A] [--cpus N] [--seed S] [--preempt]
        [--size OPENS_PER_CPU]
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

try:
    import smpkprobes
except ImportError:      # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smpkprobes import Kprobe
from smpkprobes.scenario import scenario_main

ENOMEM = 12
EVERY = 3


def open_count(m) -> int:
    """do_sys_open's fd counter (a static in the guest): how often its body ran."""
    addr = m.kallsyms_lookup_name("open_count")
    return int.from_bytes(m.read_memory(addr, m.backend.word_bytes), m.backend.endian)


async def scenario(m, report, args) -> None:
    n = args.size or 30
    calls = [0] * m.ncpus
    injected = [0] * m.ncpus

    def inject(p, regs):
        cpu = regs.cpu.id
        calls[cpu] += 1
        if calls[cpu] % EVERY:
            return 0                       # let this one through
        injected[cpu] += 1
        m.backend.cc.emulate_return(regs, -ENOMEM)
        return 1                           # we changed the IP: no single-step

    unprobed = await m.call("do_sys_open", -100, 0, 0, 0)
    # A probe that changes the IP must not be jump-optimized (an optimized probe ignores
    # regs.ip): an empty post_handler suppresses optimization, as
    # Documentation/trace/kprobes.rst tells its users.
    kp = Kprobe(symbol_name="do_sys_open", pre_handler=inject,
                post_handler=lambda p, r, f: None)
    await m.kprobes.register_kprobe(kp)
    count0 = open_count(m)
    failures: dict[int, int] = {}

    async def run(cpu):
        failures[cpu] = await m.call("open_loop", n, 0, cpu=cpu)

    async with trio.open_nursery() as nursery:
        for c in range(m.ncpus):
            nursery.start_soon(run, c)
    bodies = open_count(m) - count0
    in_loops = list(injected)
    # A direct call on cpu0, lined up to be an injected one.
    while (calls[0] + 1) % EVERY:
        await m.call("do_sys_open", -100, 0, 0, 0, cpu=0)
    direct = await m.call("do_sys_open", -100, 0, 0, 0, cpu=0)
    await m.kprobes.unregister_kprobe(kp)
    after = await m.call("open_loop", n, 0)

    report.print("fault_injection: Don't drink and probe.")
    report.print(f"  pre_handler on do_sys_open returns -ENOMEM on every {EVERY}rd call; "
                 f"{m.ncpus} CPUs x open_loop({n}, 0)")
    report.print(f"  {'cpu':>4} {'opens':>6} {'injected':>9} {'open_loop failures':>19}")
    for c in range(m.ncpus):
        report.print(f"  {c:>4} {n:>6} {in_loops[c]:>9} {failures[c]:>19}")
    report.print(f"  do_sys_open's body ran {bodies} times for {n * m.ncpus} opens; a direct "
                 f"call returned {direct} (unprobed: {unprobed}); after unregister "
                 f"open_loop({n}, 0) failed {after} times")
    report.expect(all(failures[c] == in_loops[c] == n // EVERY for c in range(m.ncpus)),
                  f"each open_loop counted exactly its {n // EVERY} injected failures "
                  f"({failures})")
    report.expect(bodies == n * m.ncpus - m.ncpus * (n // EVERY),
                  f"do_sys_open's body was skipped for every injected call ({bodies} ran)")
    report.expect(direct == -ENOMEM and unprobed == -2,
                  f"a direct call saw -ENOMEM ({direct}), not -ENOENT ({unprobed})")
    report.expect(after == 0, f"after unregistering, every open succeeds ({after} failed)")
    report.expect(kp.nmissed == 0, f"nmissed {kp.nmissed}")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__))

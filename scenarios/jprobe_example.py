"""samples/kprobes/jprobe_example.c on the simulated SMP machine.

A jprobe on do_fork whose entry mirrors do_fork's signature and prints its arguments, while
every CPU runs fork_loop at once (--size calls each, default 5).  The entry is the guest's
own jdo_fork (C, printing through printk), or with --python-entry a Python function that
prints the same line.  Like the Linux sample it prints; it also checks what it printed, and
exits 1 if an expectation fails.

    python scenarios/jprobe_example.py [--arch A] [--cpus N] [--seed S] [--preempt] [--size L]
                                       [--python-entry]
"""

from __future__ import annotations

import sys
from pathlib import Path


try:
    import smpkprobes
except ImportError:      # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import smpkprobes
from smpkprobes.scenario import on_every_cpu, scenario_main

SYMBOL = "do_fork"


def configure(ap) -> None:
    ap.add_argument("--python-entry", action="store_true",
                    help="a Python entry instead of the guest's jdo_fork")


async def scenario(m, report, args) -> None:
    loops = args.size or 5
    python_entry = getattr(args, "python_entry", False)
    pw = m.backend.bits // 4            # "%p": the bare pointer, zero-padded
    fmt = "jprobe: clone_flags = 0x{:x}, stack_start = 0x{:x} regs = 0x{:0%dx}" % pw
    host_lines = []

    def jdo_fork(clone_flags, stack_start, regs, stack_size, parent_tidptr, child_tidptr):
        host_lines.append(fmt.format(clone_flags, stack_start, regs))
        report.print(host_lines[-1])
        smpkprobes.jprobe_return()

    jp = smpkprobes.Jprobe(jdo_fork if python_entry else "jdo_fork", symbol_name=SYMBOL)
    await m.kprobes.register_jprobe(jp)
    addr = jp.kp.addr
    where = "python jdo_fork" if python_entry else f"{m.kallsyms_lookup_name('jdo_fork'):0{pw}x}"
    report.print(f"Planted jprobe at {addr:0{pw}x}, handler addr {where}")

    last_pid = m.kallsyms_lookup_name("last_pid")

    def read_last_pid() -> int:
        return int.from_bytes(m.read_memory(last_pid, m.backend.word_bytes), m.backend.endian)
    first = read_last_pid()
    log_start = len(m.printk_log)
    results = await on_every_cpu(m, "fork_loop", loops)

    await m.kprobes.unregister_jprobe(jp)
    last = read_last_pid()
    guest_lines = m.printk_log[log_start:]
    for line in guest_lines:
        report.print(line)
    report.print(f"jprobe at {addr:0{pw}x} unregistered")

    calls = m.ncpus * loops
    lines = host_lines if python_entry else guest_lines
    report.print(f"summary: {calls} calls of {SYMBOL} from fork_loop on {m.ncpus} CPUs, "
                 f"{len(lines)} jprobe lines, last_pid {first} -> {last}, "
                 f"nmissed {jp.nmissed}")
    report.expect(results == {c: loops for c in range(m.ncpus)},
                  f"fork_loop returns {loops} on every CPU (got {results})")
    report.expect(lines == [fmt.format(0x11, 0, 0)] * calls,
                  f"one jprobe line with do_fork's arguments per call ({len(lines)} "
                  f"for {calls})")
    report.expect(not (python_entry and guest_lines), "only the Python entry prints")
    report.expect(last - first == calls,
                  f"do_fork itself runs once per call (last_pid moved by {last - first})")
    report.expect(jp.nmissed == 0, f"nmissed is 0 (got {jp.nmissed})")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__, configure=configure))

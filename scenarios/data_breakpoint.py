"""samples/hw_breakpoint/data_breakpoint.c on the simulated SMP machine.

A wide write breakpoint on watched_counter, which do_fork writes on every call, while every
CPU runs fork_loop at once (--size calls each, default 2).  Like the Linux sample, its handler
prints "<symbol> value is changed", the stack, and "Dump stack from sample_hbp_handler".  It
also checks that every CPU triggered once per call it made, exactly (last_pid is the guest's
own count of the calls), and exits 1 if an expectation fails.  sparc64 has no hardware
breakpoints in Linux: registration fails, and the sample says why.

    python scenarios/data_breakpoint.py [--arch A] [--cpus N] [--seed S] [--preempt] [--size L]
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path


try:
    import smpkprobes
except ImportError:      # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import smpkprobes
from smpkprobes.scenario import on_every_cpu, scenario_main

KSYM = "watched_counter"


def read_word(m, name: str) -> int:
    w = m.backend.word_bytes
    return int.from_bytes(m.read_memory(m.kallsyms_lookup_name(name), w), m.backend.endian)


async def scenario(m, report, args) -> None:
    loops = args.size or 2
    per_cpu = [0] * m.ncpus
    traces = []

    def sample_hbp_handler(bp, data, regs):
        per_cpu[data.cpu] += 1
        trace = regs.stack_trace()
        traces.append(trace)
        task = regs.cpu.current
        report.print(f"{KSYM} value is changed")
        report.print(f"CPU: {data.cpu} PID: {task.pid} Comm: {task.comm}")
        report.print("Call Trace:")
        for addr in trace:
            report.print(f" {m.format_addr(addr)}")
        report.print("Dump stack from sample_hbp_handler")

    attr = smpkprobes.HwBreakpointAttr(symbol_name=KSYM, bp_len=m.backend.word_bytes,
                                       bp_type="w")
    try:
        bp = await m.hw_breakpoints.register_wide_hw_breakpoint(attr, sample_hbp_handler)
    except smpkprobes.KprobeError as err:
        report.print("Breakpoint registration failed")
        report.print(f"  {err.strerror}")
        report.expect(m.hw_breakpoints.facts.unsupported is not None
                      and err.errno == errno.ENOSYS,
                      f"registration fails only where the arch has no hardware breakpoints "
                      f"(got {err})")
        return
    report.print(f"HW Breakpoint for {KSYM} write installed")

    before = read_word(m, "last_pid")
    results = await on_every_cpu(m, "fork_loop", loops)
    calls = read_word(m, "last_pid") - before

    await m.hw_breakpoints.unregister_wide_hw_breakpoint(bp)
    report.print(f"HW Breakpoint for {KSYM} write uninstalled")

    report.print(f"summary: {calls} calls of do_fork on {m.ncpus} CPUs, {bp.hits} triggered "
                 f"handler calls, per CPU {per_cpu}")
    report.expect(results == {c: loops for c in range(m.ncpus)},
                  f"fork_loop returns {loops} on every CPU (got {results})")
    report.expect(per_cpu == [loops] * m.ncpus,
                  f"each CPU triggers once per write it makes: {loops} (got {per_cpu})")
    report.expect(bp.hits == calls == loops * m.ncpus,
                  f"one triggered call per guest write: {bp.hits} for last_pid's {calls}")
    names = [[m.symbolize(a)[0] if m.symbolize(a) else "?" for a in t[:2]] for t in traces]
    # (ppc's unwinder cannot see past a leaf that keeps its return address in LR: there
    # the trace is do_fork alone.)
    report.expect(all(n[0] == "do_fork" and n[1:] in ([], ["fork_loop"]) for n in names),
                  f"every stack trace starts in do_fork, called from fork_loop (got "
                  f"{names[:2]})")
    report.expect(not m.hw_breakpoints.stale_triggers,
                  f"no handler after unregister ({len(m.hw_breakpoints.stale_triggers)})")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__))

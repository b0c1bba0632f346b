"""samples/kprobes/kretprobe_example.c on the simulated SMP machine.

A kretprobe on do_fork (or, with --func do_sys_open, on do_sys_open) whose entry handler
stamps the CPU's virtual time into ri.data and whose return handler prints the return value
and how long the call took, while every CPU runs fork_loop (or open_loop) at once (--size
calls each, default 5).  maxactive is 20, and the number of missed instances is printed at
unregister, as in the Linux sample.  It also checks what it printed, and exits 1 if an
expectation fails.

    python scenarios/kretprobe_example.py [--arch A] [--cpus N] [--seed S] [--preempt]
                                          [--size L] [--func do_fork|do_sys_open]
                                          [--maxactive M]
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

try:
    import smpkprobes
except ImportError:      # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import smpkprobes
from smpkprobes.scenario import scenario_main

# The workload that calls each probed function.
WORKLOADS = {"do_fork": "fork_loop", "do_sys_open": "open_loop"}
OPEN_FAIL_EVERY = 2      # open_loop: every second open fails with -ENOENT


def configure(ap) -> None:
    ap.add_argument("--func", choices=sorted(WORKLOADS), default="do_fork",
                    help="the function to return-probe (the sample's 'func' parameter)")
    ap.add_argument("--maxactive", type=int, default=20)


async def scenario(m, report, args) -> None:
    loops = args.size or 5
    func = getattr(args, "func", "do_fork")
    maxactive = getattr(args, "maxactive", 20)
    pw = m.backend.bits // 4            # "%p": the bare pointer, zero-padded
    order = m.backend.endian
    returns = []

    def entry_handler(ri, regs):
        ri.data[:] = regs.cpu.now_ns().to_bytes(8, order, signed=True)
        return 0

    def ret_handler(ri, regs):
        # int retval = regs_return_value(regs): the low 32 bits, signed.
        raw = smpkprobes.regs_return_value(regs) & 0xFFFFFFFF
        retval = raw - (1 << 32) if raw & 0x80000000 else raw
        delta = regs.cpu.now_ns() - int.from_bytes(ri.data, order, signed=True)
        returns.append((retval, delta))
        report.print(f"{func} returned {retval} and took {delta} ns to execute")
        return 0

    rp = smpkprobes.Kretprobe(handler=ret_handler, entry_handler=entry_handler, data_size=8,
                              maxactive=maxactive, symbol_name=func)
    try:
        await m.kprobes.register_kretprobe(rp)
    except smpkprobes.KprobeError as err:
        report.print(f"register_kretprobe failed, returned {-err.errno}")
        report.expect(False, f"register_kretprobe on {func} succeeds")
        return
    addr = rp.kp.addr
    report.print(f"Planted return probe at {func}: {addr:0{pw}x}")

    workload = WORKLOADS[func]
    call_args = (loops,) if func == "do_fork" else (loops, OPEN_FAIL_EVERY)
    results = {}

    async def loop(cpu):
        results[cpu] = await m.call(workload, *call_args, cpu=cpu)
    async with trio.open_nursery() as n:
        for cpu in range(m.ncpus):
            n.start_soon(loop, cpu)

    await m.kprobes.unregister_kretprobe(rp)
    report.print(f"kretprobe at {addr:0{pw}x} unregistered")
    # nmissed > 0 suggests that maxactive was set too low.
    report.print(f"Missed probing {rp.nmissed} instances of {func}")

    calls = m.ncpus * loops
    values = [v for v, _ in returns]
    backwards = sum(1 for _, d in returns if d < 0)
    report.print(f"summary: {calls} calls of {func} from {workload} on {m.ncpus} CPUs, "
                 f"{len(returns)} returns handled, {rp.nmissed} missed, "
                 f"maxactive {rp.maxactive}")
    if backwards:
        # Not an expectation (yet): the simulated clock, not kretprobes, is at fault.
        report.print(f"WARNING: {backwards} of {len(returns)} durations are negative: the "
                     f"CPUs' virtual clock went backwards between entry and return")
    if func == "do_fork":
        report.expect(results == {c: loops for c in range(m.ncpus)},
                      f"fork_loop returns {loops} on every CPU (got {results})")
        report.expect(len(set(values)) == len(values) and all(v > 100 for v in values),
                      "do_fork returns a new pid on every handled call")
    else:
        failures = loops // OPEN_FAIL_EVERY
        report.expect(results == {c: failures for c in range(m.ncpus)},
                      f"open_loop returns {failures} failures on every CPU (got {results})")
        report.expect(all(v == -2 or v >= 3 for v in values),
                      "do_sys_open returns -2 (ENOENT) or an fd >= 3")
        if rp.nmissed == 0:
            report.expect(values.count(-2) == failures * m.ncpus,
                          "the handler sees every failed open as -2")
    report.expect(len(returns) + rp.nmissed == calls,
                  f"every call is handled or missed ({len(returns)} + {rp.nmissed} "
                  f"for {calls})")
    if rp.maxactive >= m.ncpus:
        # One task per CPU: never more than NR_CPUS calls in flight.
        report.expect(rp.nmissed == 0, f"no miss with maxactive {rp.maxactive} >= "
                                       f"{m.ncpus} CPUs (got {rp.nmissed})")
    report.expect(not m.kprobes.simulation_errors,
                  f"no simulation error ({m.kprobes.simulation_errors})")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__, configure=configure))

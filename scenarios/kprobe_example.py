"""samples/kprobes/kprobe_example.c on the simulated SMP machine.

A kprobe on do_fork whose pre and post handlers print the probe address, the instruction
pointer and the flags, while every CPU runs fork_loop at once (--size calls each, default 5).
Like the Linux sample it prints; it also checks what it printed, and exits 1 if an
expectation fails.

    python scenarios/kprobe_example.py [--arch A] [--cpus N] [--seed S] [--preempt] [--size L]
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


async def scenario(m, report, args) -> None:
    loops = args.size or 5
    pw = m.backend.bits // 4            # "%p": the bare pointer, zero-padded
    pre, post = [], []

    def handler_pre(p, regs):
        pre.append((regs.cpu.id, regs.ip))
        report.print(f"pre_handler: p->addr = 0x{p.addr:0{pw}x}, ip = {regs.ip:x}, "
                     f"flags = 0x{regs.flags:x}")
        return 0

    def handler_post(p, regs, flags):
        post.append(flags)
        report.print(f"post_handler: p->addr = 0x{p.addr:0{pw}x}, flags = 0x{regs.flags:x}")

    def handler_fault(p, regs, trapnr):
        report.print(f"fault_handler: p->addr = 0x{p.addr:0{pw}x}, trap #{trapnr}")
        return 0

    kp = smpkprobes.Kprobe(symbol_name=SYMBOL, pre_handler=handler_pre,
                           post_handler=handler_post, fault_handler=handler_fault)
    await m.kprobes.register_kprobe(kp)
    addr = kp.addr
    report.print(f"Planted kprobe at {addr:0{pw}x}")

    results = await on_every_cpu(m, "fork_loop", loops)

    await m.kprobes.unregister_kprobe(kp)
    report.print(f"kprobe at {addr:0{pw}x} unregistered")

    calls = m.ncpus * loops
    per_cpu = {c: sum(1 for cpu, _ in pre if cpu == c) for c in range(m.ncpus)}
    report.print(f"summary: {calls} calls of {SYMBOL} on {m.ncpus} CPUs, {len(pre)} "
                 f"pre_handler and {len(post)} post_handler runs, per CPU {per_cpu}, "
                 f"nmissed {kp.nmissed}")
    report.expect(results == {c: loops for c in range(m.ncpus)},
                  f"fork_loop returns {loops} on every CPU (got {results})")
    report.expect(len(pre) == len(post) == calls,
                  f"one pre and one post_handler run per call ({len(pre)}/{len(post)} "
                  f"for {calls})")
    report.expect(per_cpu == {c: loops for c in range(m.ncpus)},
                  f"each CPU hits the probe {loops} times")
    report.expect(all(ip == addr for _, ip in pre), "pre_handler sees ip == p->addr")
    report.expect(post == [0] * len(post), "post_handler's flags argument is 0")
    report.expect(kp.nmissed == 0, f"nmissed is 0 (got {kp.nmissed})")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__))

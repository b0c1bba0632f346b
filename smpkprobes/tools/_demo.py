"""`smpkprobes demo` (`make demo`): the whole idea in one run, every printed block labelled,
ending with a verdict line."""

from __future__ import annotations

import trio

from .._system import Machine

FORKS = 200          # fork_loop(FORKS) on every CPU: the probe must see exactly FORKS x CPUs


async def demo(arch: str = "x86_64", cpus: int = 4, seed: int = 1, preempt: bool = False,
               out=print) -> int:
    """Boot a machine, put a kprobe on do_fork, run fork_loop, sleepy and fib concurrently on
    every CPU, and check that the probe saw every call.  Returns the exit status."""
    from ..kprobes._core import Kprobe
    async with Machine(arch=arch, cpus=cpus, seed=seed, preempt=preempt) as m:
        out(f"smpkprobes demo: {arch}, {cpus} CPUs, seed {seed}"
            f"{', preemptible' if preempt else ''}: a kprobe on do_fork while every CPU runs "
            f"fork_loop({FORKS}), sleepy(ms) and fib(12) at once")
        hits = [0] * cpus
        kp = Kprobe(symbol_name="do_fork",
                    pre_handler=lambda p, regs: hits.__setitem__(regs.cpu.id, hits[regs.cpu.id] + 1))
        await m.kprobes.register_kprobe(kp)
        results = {}

        async def one(func, arg, cpu):
            results[(func, cpu)] = await m.call(func, arg, cpu=cpu)

        async with trio.open_nursery() as n:
            for c in range(cpus):
                n.start_soon(one, "fork_loop", FORKS, c)
                n.start_soon(one, "sleepy", 2 + c, c)
                n.start_soon(one, "fib", 12, c)
        await m.call("printk_test", 42)
        out("\ndebugfs kprobes/list (address, type, symbol+offset) while the probe is registered:")
        for line in m.debugfs.read("kprobes/list").splitlines():
            out(f"  {line}")
        await m.kprobes.unregister_kprobe(kp)
        st = m.statistics()
        out("\nper CPU:")
        out(f"  {'cpu':>3} {'instructions':>13} {'tasks':>6} {'do_fork hits':>13}")
        for c in m.cpus:
            out(f"  {c.id:>3} {c.instructions:>13,} {c.tasks_run:>6} {hits[c.id]:>13}")
        out(f"\nmachine: {st.instructions:,} instructions in {st.quanta:,} quanta, "
            f"{st.tasks} tasks, {st.grace_periods} grace period(s), {st.text_syncs} text syncs")
        out("\nguest calls (cpu: function -> return value):")
        for (func, cpu), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            out(f"  cpu{cpu}: {func} -> {r}")
        out("\nprintk log:")
        for line in m.printk_log:
            out(f"  {line}")
        out(f"\ntrace digest: {m.trace_digest()} (the same seed gives the same digest)")
        want = FORKS * cpus
        ok = sum(hits) == want and kp.nmissed == 0 and not m.oopses
        out(f"verdict: {'PASS' if ok else 'FAIL'}: do_fork probe hit {sum(hits)} times "
            f"(expected {want} = {FORKS} calls x {cpus} CPUs), nmissed {kp.nmissed}, "
            f"{len(m.oopses)} oops(es)")
        return 0 if ok else 1

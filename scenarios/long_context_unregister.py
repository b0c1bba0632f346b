"""long_context_unregister: probes unregistered while CPUs are deep inside their long probe contexts.

A grace period must wait for every CPU that is inside a probe context, however long that
context lasts (KPROBES.md section 5).  The contexts here are long on purpose, so that a
grace period that only waits a quantum, or that ignores a CPU in the middle of a step or a
handler, lets the unregister return while a CPU is still inside:

  - a kprobe on bench_loop whose pre_handler calls a guest function from the handler
    (`regs.cpu.call("fib", K)`: thousands of instructions inside the handler);
  - a jprobe on do_fork whose entry is the guest's jdo_fork (printk inside the jprobe);
  - a kretprobe on fib, a recursive function, so many instances of one task are in
    flight at once, with tasks preempted inside it under --preempt;
  - a kprobe with a post_handler on bench_target (a single-step on every hit).

Each probe sits on a function of its own, so that each unregistration frees its probe (a
child leaving an aggregate frees nothing).  Which probes, the depth K and when each is
unregistered are drawn from the seed.  Every CPU
keeps calling fork_loop, fib and bench_loop while the host unregisters the probes one by
one (or in one batch), at moments it learns from the handlers themselves: right after some
CPU entered the long context.  Then:

  - no handler of a probe runs after its unregister returned (its return handler neither);
  - every call returns the right value: fork_loop n, fib its Fibonacci number, bench_loop
    its sum;
  - nothing leaks: the text is original, nothing is registered, no slot is in use.

    python scenarios/long_context_unregister.py [--arch A] [--cpus N] [--seed S] [--preempt]
        [--size ROUNDS]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import trio

try:
    import smpkprobes
except ImportError:      # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smpkprobes import Jprobe, Kprobe, Kretprobe
from smpkprobes.scenario import scenario_main


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def bench_sum(n: int) -> int:
    """bench_loop(n): the sum of bench_target(i) = 2i + 1 for i < n, that is n * n."""
    return n * n


async def scenario(m, report, args) -> None:
    rng = random.Random(f"long_context_unregister {args.seed}")
    rounds = args.size or 3
    depth = rng.randint(8, 13)          # the handler's nested fib(depth)
    gone: set[str] = set()
    late: list[str] = []
    entered = {name: trio.Event() for name in ("nested", "jprobe", "kretprobe", "stepped")}

    def mark(name, regs=None):
        if name in gone:
            late.append(name)
        entered[name].set()

    def nested_pre(p, regs):
        mark("nested")
        if regs.cpu.call("fib", depth) != fib(depth):
            late.append(f"nested fib({depth}) wrong")
        if "nested" in gone:             # the handler outlived its unregister
            late.append("nested (still in the handler)")
        return 0

    def rp_entry(ri, regs):
        mark("kretprobe")
        return 0

    def rp_ret(ri, regs):
        mark("kretprobe")

    def stepped_pre(p, regs):
        mark("stepped")
        return 0

    def stepped_post(p, regs, flags):
        mark("stepped")

    def make():
        probes = {
            "nested": Kprobe(symbol_name="bench_loop", pre_handler=nested_pre),
            "jprobe": Jprobe("jdo_fork", symbol_name="do_fork"),
            "kretprobe": Kretprobe(symbol_name="fib", entry_handler=rp_entry, handler=rp_ret,
                                   maxactive=rng.choice((4, 16, 64))),
            "stepped": Kprobe(symbol_name="bench_target", pre_handler=stepped_pre,
                              post_handler=stepped_post),
        }
        chosen = [k for k in probes if rng.random() < 0.75] or ["nested"]
        return {k: probes[k] for k in chosen}

    # A CPU inside the jprobe's guest entry runs no Python; a kprobe on that entry (jdo_fork)
    # tells the host one got there: its hit is a reentry (the jprobe is the CPU's current
    # kprobe), so it shows as nmissed.
    spy = Kprobe(symbol_name="jdo_fork", pre_handler=lambda p, regs: 0)
    await m.kprobes.register_kprobe(spy)

    async def inside(name) -> None:
        if name != "jprobe":
            await entered[name].wait()
            return
        seen = spy.nmissed
        for _ in range(200):
            if spy.nmissed != seen:
                return
            await m.sleep_ns(1_000_000)

    async def register(name, p):
        if isinstance(p, Kretprobe):
            await m.kprobes.register_kretprobe(p)
        elif isinstance(p, Jprobe):
            await m.kprobes.register_jprobe(p)
        else:
            await m.kprobes.register_kprobe(p)

    async def unregister(name, p):
        if isinstance(p, Kretprobe):
            await m.kprobes.unregister_kretprobe(p)
        elif isinstance(p, Jprobe):
            await m.kprobes.unregister_jprobe(p)
        else:
            await m.kprobes.unregister_kprobe(p)
        gone.add(name)

    stop = [False]
    wrong: list[tuple] = []
    calls = [0]

    async def firing(cpu):
        while not stop[0]:
            for func, arg, want in (("fork_loop", 8, 8), ("fib", 9, fib(9)),
                                    ("bench_loop", 6, bench_sum(6))):
                got = await m.call(func, arg, cpu=cpu)
                calls[0] += 1
                if got != want:
                    wrong.append((func, arg, got, want))

    batches = 0
    async with trio.open_nursery() as nursery:
        for cpu in range(m.ncpus):
            nursery.start_soon(firing, cpu)
        for _ in range(rounds):
            gone.clear()
            for ev in entered:
                entered[ev] = trio.Event()
            probes = make()
            for name, p in probes.items():
                await register(name, p)
            names = list(probes)
            if rng.random() < 0.5:
                # one batch of the kprobes, the rest one by one: wait until a CPU entered
                # the first one's long context
                await inside(names[0])
                kps = [(n, p) for n, p in probes.items() if type(p) is Kprobe]
                if kps:
                    await m.kprobes.unregister_kprobes([p for _, p in kps])
                    gone.update(n for n, _ in kps)
                    batches += 1
                for n, p in probes.items():
                    if n not in gone:
                        await unregister(n, p)
            else:
                rng.shuffle(names)
                for name in names:
                    await inside(name)
                    await unregister(name, probes[name])
        stop[0] = True
    await m.kprobes.unregister_kprobe(spy)

    report.expect(not late, f"no handler ran after its probe's unregister returned "
                            f"({len(late)} did: {late[:3]})")
    report.expect(not wrong, f"every call returned the right value ({len(wrong)} wrong: "
                             f"{wrong[:3]})")
    report.expect(m.debugfs.read("kprobes/list") == "", "nothing is left registered")
    report.print(f"long_context_unregister: {rounds} rounds, nested fib({depth}) in the "
                 f"handler, {batches} batch unregisters, {calls[0]} guest calls on "
                 f"{m.ncpus} CPUs")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__))

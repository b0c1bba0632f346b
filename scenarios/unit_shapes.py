"""unit_shapes: the probe shapes of the unit tests, on every CPU at once and under preemption.

The unit tests check these shapes one call at a time; here every CPU runs them together,
with the seed choosing which shapes are built and how (so stress seeds differ in what they
build as well as in how they interleave):

  - an aggregate on kprobe_target whose first child has no post_handler while a later
    one does: every call is one pre of each child and one post of the later child;
  - a kretprobe on kprobe_target whose entry_handler returns non-zero for odd arguments:
    those calls get no return handler, the even ones one each, and every return handler
    sees v / 3 and the argument its own entry stamped into ri.data;
  - a jprobe on jprobe_stackargs_target whose guest entry scribbles over its stack and
    register arguments: the probed function must still see the caller's ten arguments;
  - two or three kretprobes on fib, a recursive function: every call of fib is one return
    handler run or one nmissed of each, and each handler sees fib of the argument its
    entry stamped.

    python scenarios/unit_shapes.py [--arch A] [--cpus N] [--seed S] [--preempt] [--size N]
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

from smpkprobes import Jprobe, Kprobe, Kretprobe, regs_return_value
from smpkprobes.scenario import scenario_main


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def fib_calls(n: int) -> int:
    """How many times fib(n) calls fib, itself included."""
    return 1 if n < 2 else 1 + fib_calls(n - 1) + fib_calls(n - 2)


def stackargs(base: int) -> int:
    """jprobe_stackargs_caller(base): sum of (k + 1) * (base + k) for k < 10."""
    return sum((k + 1) * (base + k) for k in range(10))


async def scenario(m, report, args) -> None:
    rng = random.Random(f"unit_shapes {args.seed}")
    shapes = [s for s in ("aggregate", "entry_nonzero", "jprobe_scribble", "kretprobes_fib")
              if rng.random() < 0.7] or ["aggregate"]
    loops = args.size or 6
    depth = rng.randint(5, 9)
    word = m.backend.bits // 8
    mask = (1 << m.backend.bits) - 1
    count = {"pre0": 0, "pre1": 0, "post0": 0, "post1": 0, "ret": 0, "entry": 0}
    bad: list[str] = []
    probes: list = []

    # -- the shapes ---------------------------------------------------------------------
    if "aggregate" in shapes:
        def pre(i):
            def handler(p, regs):
                count[f"pre{i}"] += 1
                return 0
            return handler

        def post(p, regs, flags):
            count["post1"] += 1
        probes += [Kprobe(symbol_name="kprobe_target", pre_handler=pre(0)),
                   Kprobe(symbol_name="kprobe_target", pre_handler=pre(1), post_handler=post)]

    if "entry_nonzero" in shapes:
        def entry(ri, regs):
            v = regs.arg(0)
            count["entry"] += 1
            ri.data[:word] = v.to_bytes(word, "little")
            return v & 1                 # odd: no return probe for this call

        def ret(ri, regs):
            v = int.from_bytes(ri.data[:word], "little")
            count["ret"] += 1
            if v & 1 or regs_return_value(regs) != v // 3:
                bad.append(f"kprobe_target({v}) returned {regs_return_value(regs)} "
                           f"to a return handler")
        probes.append(Kretprobe(symbol_name="kprobe_target", entry_handler=entry,
                                handler=ret, data_size=word, maxactive=4 * m.ncpus))

    if "jprobe_scribble" in shapes:
        probes.append(Jprobe("jprobe_scribble_handler", symbol_name="jprobe_stackargs_target"))

    fib_rps: list[tuple[Kretprobe, list[int]]] = []
    if "kretprobes_fib" in shapes:
        for k in range(rng.choice((2, 3))):
            runs = [0]

            def fentry(ri, regs):
                ri.data[:word] = regs.arg(0).to_bytes(word, "little")
                return 0

            def fret(ri, regs, runs=runs):
                n = int.from_bytes(ri.data[:word], "little")
                runs[0] += 1
                if regs_return_value(regs) & mask != fib(n) & mask:
                    bad.append(f"fib({n}) returned {regs_return_value(regs)} to a handler")
            rp = Kretprobe(symbol_name="fib", entry_handler=fentry, handler=fret,
                           data_size=word, maxactive=rng.choice((3, 8, 40)))
            fib_rps.append((rp, runs))
            probes.append(rp)

    for p in probes:
        if isinstance(p, Kretprobe):
            await m.kprobes.register_kretprobe(p)
        elif isinstance(p, Jprobe):
            await m.kprobes.register_jprobe(p)
        else:
            await m.kprobes.register_kprobe(p)

    # -- every CPU at once --------------------------------------------------------------
    wrong: list[tuple] = []
    targets: list[int] = []

    async def worker(cpu):
        for i in range(loops):
            v = cpu * 100 + i
            targets.append(v)
            for func, arg, want in (("kprobe_target", v, v // 3),
                                    ("jprobe_stackargs_caller", v, stackargs(v)),
                                    ("fib", depth, fib(depth))):
                got = await m.call(func, arg, cpu=cpu)
                if got & mask != want & mask:
                    wrong.append((func, arg, got, want))

    async with trio.open_nursery() as nursery:
        for cpu in range(m.ncpus):
            nursery.start_soon(worker, cpu)

    calls = len(targets)
    if "aggregate" in shapes:
        a, b = probes[0], probes[1]
        report.expect((count["pre0"] + a.nmissed, count["pre1"] + b.nmissed, count["post1"])
                      == (calls, calls, count["pre1"]),
                      f"aggregate, first child without post_handler: pre {count['pre0']}+"
                      f"{a.nmissed} missed, pre {count['pre1']}+{b.nmissed}, post "
                      f"{count['post1']}, for {calls} calls")
    if "entry_nonzero" in shapes:
        evens = sum(1 for v in targets if not v & 1)
        rp = next(p for p in probes if isinstance(p, Kretprobe) and p.kp.symbol_name ==
                  "kprobe_target")
        # One worker task per CPU: at most ncpus instances in flight, so none is missed.
        report.expect((count["entry"], rp.nmissed, count["ret"]) == (calls, 0, evens),
                      f"entry_handler non-zero for odd arguments: {count['entry']} entries, "
                      f"{count['ret']} returns, {rp.nmissed} missed, for {calls} calls "
                      f"({evens} even)")
    for rp, runs in fib_rps:
        want = fib_calls(depth) * calls
        report.expect(runs[0] + rp.nmissed == want,
                      f"kretprobe (maxactive {rp.maxactive}) on recursive fib: "
                      f"{runs[0]} returns + {rp.nmissed} missed == {want} calls")
    report.expect(not bad, f"every return handler saw the right value ({bad[:3]})")
    report.expect(not wrong, f"every call returned the right value with the probes on "
                             f"({len(wrong)} wrong: {wrong[:3]})")

    for p in probes:
        if isinstance(p, Kretprobe):
            await m.kprobes.unregister_kretprobe(p)
        elif isinstance(p, Jprobe):
            await m.kprobes.unregister_jprobe(p)
        else:
            await m.kprobes.unregister_kprobe(p)
    report.expect(m.debugfs.read("kprobes/list") == "", "nothing is left registered")
    report.print(f"unit_shapes: {', '.join(shapes)}; {calls} rounds on {m.ncpus} CPUs, "
                 f"fib({depth})")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__))

"""aggregate_churn: register, enable, disable and unregister children of an aggregate while every CPU fires.

An aggregate on do_fork (kprobes and a kretprobe's entry probe, drawn from the seed: how
many, which have a post_handler, the first one never) goes through a churn of steps drawn
from the seed, while every CPU calls fork_loop without pause:

  register a child, unregister one, disable one, enable one, or switch kprobes/enabled.

After every step returns, each CPU calls do_fork once more with a marker in clone_flags.
These calls entered after the step returned, so KPROBES.md's laws are exact for them:

  - every registered, enabled child (kprobes/enabled on) sees each marked call exactly
    once: one pre_handler run (or one nmissed), one post_handler run if it has one, one
    return handler run for the kretprobe;
  - a disabled or unregistered child, or every child while kprobes/enabled is off, sees
    none;
  - the site holds the breakpoint if and only if kprobes are enabled and some child is
    enabled and not gone (KPROBES.md sections 2 and 6).

The background calls are counted too: every fork_loop returns its n, and no handler runs
after its probe's unregister returned.

    python scenarios/aggregate_churn.py [--arch A] [--cpus N] [--seed S] [--preempt]
        [--size STEPS]
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

from smpkprobes import Kprobe, Kretprobe
from smpkprobes.scenario import scenario_main

MARK = 0x5A5A          # clone_flags of the marked calls (fork_loop passes 0x11)
SYMBOL = "do_fork"


class Child:
    """One probe of the aggregate, with what its handlers saw of the marked calls."""

    def __init__(self, name: str, kind: str, post: bool):
        self.name, self.kind, self.post = name, kind, post
        self.pre = self.posts = self.returns = 0
        self.live = False               # registered, as far as the host knows
        self.gone_at: int | None = None  # the step its unregister returned
        self.late: list[str] = []
        self.probe = self._make()

    def _make(self):
        def pre(p, regs):
            self._note("pre")
            if regs.arg(0) == MARK:
                self.pre += 1
            return 0

        def post(p, regs, flags):
            self._note("post")
            if regs.arg(0) == MARK:
                self.posts += 1

        def entry(ri, regs):
            self._note("entry")
            ri.data[0] = int(regs.arg(0) == MARK)
            if ri.data[0]:
                self.pre += 1
            return 0

        def ret(ri, regs):
            self._note("return")
            if ri.data[0]:
                self.returns += 1
        if self.kind == "r":
            return Kretprobe(symbol_name=SYMBOL, entry_handler=entry, handler=ret,
                             data_size=1, maxactive=64)
        return Kprobe(symbol_name=SYMBOL, pre_handler=pre,
                      post_handler=post if self.post else None)

    def _note(self, what: str) -> None:
        if self.gone_at is not None:
            self.late.append(f"{self.name} {what} after unregister")

    @property
    def kp(self):
        return self.probe.kp if self.kind == "r" else self.probe

    @property
    def missed(self) -> int:
        return self.probe.nmissed + (self.probe.kp.nmissed if self.kind == "r" else 0)


async def register(m, c: Child) -> None:
    c.gone_at = None             # (its handlers may run before register returns)
    if c.kind == "r":
        await m.kprobes.register_kretprobe(c.probe)
    else:
        await m.kprobes.register_kprobe(c.probe)
    c.live = True


async def unregister(m, c: Child, step: int) -> None:
    if c.kind == "r":
        await m.kprobes.unregister_kretprobe(c.probe)
    else:
        await m.kprobes.unregister_kprobe(c.probe)
    c.live, c.gone_at = False, step
    c.probe = c._make()         # a fresh object for a later registration


async def scenario(m, report, args) -> None:
    rng = random.Random(f"aggregate_churn {args.seed}")   # the probe mix and the steps
    steps = args.size or 12
    n = 30
    kinds = ["k"] * rng.randint(2, 4) + (["r"] if rng.random() < 0.6 else [])
    # The first child never has a post_handler; later ones may: the aggregate must still
    # run the later ones' post_handlers (and so single-step, not boost).
    children = [Child(f"{k}{i}", k, post=(i > 0 and k == "k" and rng.random() < 0.5))
                for i, k in enumerate(kinds)]
    addr = m.kallsyms_lookup_name(SYMBOL)
    original = m.read_memory(addr, 1)
    enabled = [True]
    stop = [False]
    wrong: list[tuple] = []
    background = [0]

    async def firing(cpu):
        while not stop[0]:
            got = await m.call("fork_loop", n, cpu=cpu)
            background[0] += 1
            if got != n:
                wrong.append(("fork_loop", n, got))

    async def marked_round() -> None:
        async def one(cpu):
            await m.call(SYMBOL, MARK, 0, 0, 0, 0, 0, cpu=cpu)
        async with trio.open_nursery() as nursery:
            for cpu in range(m.ncpus):
                nursery.start_soon(one, cpu)

    def snapshot():
        return {c.name: (c.pre + c.missed, c.posts, c.returns) for c in children}

    bad: list[str] = []
    armed_wrong: list[str] = []
    async with trio.open_nursery() as nursery:
        for cpu in range(m.ncpus):
            nursery.start_soon(firing, cpu)
        for c in children[:2]:
            await register(m, c)
        for step in range(steps):
            live = [c for c in children if c.live]
            idle = [c for c in children if not c.live]
            actions = ["disable", "enable"] * 2 + ["switch"]
            actions += ["register"] * 2 if idle else []
            actions += ["unregister"] if live else []
            action = rng.choice(actions)
            if action == "register":
                await register(m, rng.choice(idle))
            elif action == "unregister":
                await unregister(m, rng.choice(live), step)
            elif action in ("disable", "enable") and live:
                c = rng.choice(live)
                if action == "disable":
                    await m.kprobes.disable_kprobe(c.kp)
                else:
                    await m.kprobes.enable_kprobe(c.kp)
            elif action == "switch":
                enabled[0] = not enabled[0]
                await m.debugfs.write("kprobes/enabled", "1" if enabled[0] else "0")
            # The law of arming, after the step returned.
            active = [c for c in children if c.live and not c.kp.disabled]
            want_armed = enabled[0] and bool(active)
            is_armed = m.read_memory(addr, 1) != original
            if want_armed != is_armed:
                armed_wrong.append(f"step {step} ({action}): armed={is_armed}, "
                                   f"want {want_armed}")
            # Calls that enter after the step returned: exact counts.
            before = snapshot()
            await marked_round()
            after = snapshot()
            for c in children:
                hit = c in active and enabled[0]
                want = (m.ncpus if hit else 0,
                        m.ncpus if hit and c.post else 0,
                        m.ncpus if hit and c.kind == "r" else 0)
                got = tuple(a - b for a, b in zip(after[c.name], before[c.name]))
                if got != want:
                    bad.append(f"step {step} ({action}): {c.name} saw {got}, want {want}")
        stop[0] = True
        if not enabled[0]:
            await m.debugfs.write("kprobes/enabled", "1")
        for c in children:
            if c.live:
                await unregister(m, c, steps)

    late = [x for c in children for x in c.late]
    report.expect(not armed_wrong, f"the site is armed iff kprobes are enabled and a child "
                                   f"is enabled ({len(armed_wrong)} wrong: {armed_wrong[:2]})")
    report.expect(not bad, f"every marked call after a step is exactly one hit of each "
                           f"enabled child and none of the others ({len(bad)} wrong: "
                           f"{bad[:2]})")
    report.expect(not wrong, f"every fork_loop returned its n under the churn ({wrong[:3]})")
    report.expect(not late, f"no handler ran after its unregister returned ({late[:3]})")
    report.expect(m.read_memory(addr, 1) == original and m.debugfs.read("kprobes/list") == "",
                  "the text is original and nothing is registered at the end")
    report.print(f"aggregate_churn: {len(children)} children ({''.join(kinds)}), {steps} "
                 f"steps, {background[0]} background fork_loop calls on {m.ncpus} CPUs")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__))

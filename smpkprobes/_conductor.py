"""The conductor: which CPU runs next, and for how many instructions.

Every CPU keeps a virtual clock (one ns per instruction).  The default policy is a
discrete-event simulation: the runnable CPU whose clock is furthest behind runs next, for a
quantum drawn log-uniformly from [qmin, qmax] by the machine's seeded generator, so quanta
range from a handful of instructions (fine enough for real races) to thousands (coarse
enough to be fast).  Ties go to the lower CPU id.  Nothing here reads the wall clock or
depends on trio's own scheduling order.

Schedules
---------
Whatever the policy, every decision is written down: `conductor.schedule` (also
`Machine.schedule`) is the run's list of `(cpu id, quantum)` choices, in order.  Three
policies make the space of interleavings something one can explore and replay:

  * `Conductor` ("random"): the seeded discrete-event policy above;
  * `PCTConductor` ("pct"): probabilistic concurrency testing, Burckhardt et al. (ASPLOS
    2010): each CPU gets a random priority, the highest-priority runnable CPU runs, and at
    d-1 random change points the running CPU drops below every other.  A bug that needs d
    particular orderings is found with probability at least 1/(n * k^(d-1)) per run;
  * `ReplayConductor`: follows a recorded schedule exactly, then hands over to a plain
    round-robin.  It still asks the recorded policy for its choice at every step, and
    ignores it, so that the policy's draws from the machine's generator (which the machine
    shares for trap deferral, IPI delays and preemption) line up: replaying a full schedule
    with the same seed reproduces the run event for event.

Choose one with `Machine(conductor=...)`: a name ("random", "pct", "pct:D" or
"pct:D:STEPS"), a factory called as `factory(rng, qmin, qmax)`, or a ready `Conductor`.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

Choice = tuple[int, int]        # (cpu id, quantum in instructions)


class Conductor:
    """The seeded random conductor.  Subclasses override `choose`; `pick` records."""

    name = "random"

    def __init__(self, rng: random.Random, qmin: int = 16, qmax: int = 4096):
        if not 1 <= qmin <= qmax:
            raise ValueError(f"bad quantum range {qmin}..{qmax}")
        self.rng = rng
        self.qmin, self.qmax = qmin, qmax
        self._lo, self._hi = math.log(qmin), math.log(qmax + 1)
        self.schedule: list[Choice] = []

    def quantum(self) -> int:
        return min(self.qmax, int(math.exp(self.rng.uniform(self._lo, self._hi))))

    def pick(self, runnable: Sequence) -> tuple[object, int]:
        """`runnable` are CPUs (with `.clock` and `.id`), in id order.  Returns the CPU to
        run and its quantum, and records the choice in `schedule`."""
        cpu, q = self.choose(runnable)
        self.schedule.append((cpu.id, q))
        return cpu, q

    def choose(self, runnable: Sequence) -> tuple[object, int]:
        cpu = min(runnable, key=lambda c: (c.clock, c.id))
        return cpu, self.quantum()

    def describe(self) -> str:
        return self.name


class PCTConductor(Conductor):
    """PCT over quanta: strict random priorities with `depth - 1` priority change points.

    A step is one quantum.  Priorities are drawn when a CPU is first seen (d + a random
    fraction, so all distinct); at the i-th change point the CPU chosen for that step
    drops to priority d - i, below every initial one.  `steps` is the expected run length in
    quanta over which the change points are spread.

    Strict priorities can starve a CPU for ever when a higher one spins on a lock the lower
    one holds.  `max_lag` bounds that: a CPU whose virtual clock is more than `max_lag` ns
    behind the chosen one runs instead.  A starved CPU therefore still waits up to
    `max_lag` instructions of the others, which is a very long time at kprobes' scale.
    """

    name = "pct"

    def __init__(self, rng: random.Random, qmin: int = 16, qmax: int = 4096, depth: int = 3,
                 steps: int = 400, max_lag: int = 200_000):
        if depth < 1 or steps < 1:
            raise ValueError(f"PCT needs depth >= 1 and steps >= 1, not {depth}, {steps}")
        # One draw from the machine's generator seeds PCT's own stream, so that PCT's
        # choices do not shift the machine's other random decisions.
        super().__init__(random.Random(rng.getrandbits(64)), qmin, qmax)
        self.depth, self.steps, self.max_lag = depth, steps, max_lag
        points = self.rng.sample(range(1, steps + 1), min(depth - 1, steps))
        self.change_points = {step: i + 1 for i, step in enumerate(sorted(points))}
        self.priority: dict[int, float] = {}
        self.step = 0

    def choose(self, runnable: Sequence) -> tuple[object, int]:
        self.step += 1
        prio = self.priority
        for c in runnable:
            if c.id not in prio:
                prio[c.id] = self.depth + self.rng.random()
        cpu = max(runnable, key=lambda c: prio[c.id])
        laggard = min(runnable, key=lambda c: (c.clock, c.id))
        if cpu.clock - laggard.clock > self.max_lag:
            cpu = laggard
        drop = self.change_points.get(self.step)
        if drop is not None:
            prio[cpu.id] = self.depth - drop
        return cpu, self.quantum()

    def describe(self) -> str:
        return f"pct:{self.depth}:{self.steps}"


class ReplayConductor(Conductor):
    """Follow `schedule` exactly, then continue round-robin with `tail_quantum`.

    `policy` is the conductor the schedule was recorded with, built on the same generator:
    it is consulted at every recorded step (its answer discarded) so the generator advances
    exactly as it did in the recorded run.  A recorded CPU that is not runnable at that
    point (possible once a schedule has been edited, e.g. by shrinking) yields to the
    policy's choice, with the recorded quantum.
    """

    name = "replay"

    def __init__(self, schedule: Sequence[Choice], policy: Conductor, tail_quantum: int = 1024):
        super().__init__(policy.rng, policy.qmin, policy.qmax)
        self.recorded = [(int(c), int(q)) for c, q in schedule]
        self.policy = policy
        self.tail_quantum = tail_quantum
        self.position = 0
        self.divergences = 0
        self._rr = -1

    def choose(self, runnable: Sequence) -> tuple[object, int]:
        i = self.position
        self.position += 1
        if i < len(self.recorded):
            fallback, _ = self.policy.choose(runnable)
            cid, q = self.recorded[i]
            cpu = next((c for c in runnable if c.id == cid), None)
            if cpu is None:
                self.divergences += 1
                cpu = fallback
            return cpu, q
        # Past the recording: a plain round-robin over CPU ids, fixed quantum, no draws.
        later = [c for c in runnable if c.id > self._rr]
        cpu = later[0] if later else runnable[0]
        self._rr = cpu.id
        return cpu, self.tail_quantum

    @property
    def exhausted(self) -> bool:
        return self.position >= len(self.recorded)

    def describe(self) -> str:
        return f"replay of {len(self.recorded)} choices over {self.policy.describe()}"


def policy_factory(name: str) -> Callable[[random.Random, int, int], Conductor]:
    """"random", "pct", "pct:D" or "pct:D:STEPS" -> a factory `f(rng, qmin, qmax)`."""
    head, *params = name.split(":")
    if head == "random" and not params:
        return Conductor
    if head == "pct" and len(params) <= 2:
        try:
            nums = [int(p) for p in params]
        except ValueError:
            nums = None
        if nums is not None:
            kw = dict(zip(("depth", "steps"), nums))
            return lambda rng, qmin, qmax: PCTConductor(rng, qmin, qmax, **kw)
    raise ValueError(f"unknown schedule policy {name!r}: use random, pct, pct:D or pct:D:STEPS")


def replay_factory(schedule: Sequence[Choice], policy: str = "random",
                   tail_quantum: int = 1024) -> Callable[[random.Random, int, int], Conductor]:
    """A factory for `Machine(conductor=...)` that replays `schedule` recorded under
    `policy`."""
    make = policy_factory(policy)
    return lambda rng, qmin, qmax: ReplayConductor(schedule, make(rng, qmin, qmax), tail_quantum)


def make_conductor(spec, rng: random.Random, quantum: tuple[int, int]) -> Conductor:
    """What `Machine(conductor=spec)` does with `spec`."""
    if spec is None:
        return Conductor(rng, *quantum)
    if isinstance(spec, Conductor):
        return spec
    if isinstance(spec, str):
        return policy_factory(spec)(rng, *quantum)
    if callable(spec):
        return spec(rng, *quantum)
    raise TypeError(f"conductor must be a policy name, a factory or a Conductor, not {spec!r}")


def format_schedule(schedule: Sequence[Choice]) -> str:
    """A compact, command-line friendly form: "0:120,2:16,1:4096"."""
    return ",".join(f"{c}:{q}" for c, q in schedule)


def parse_schedule(text: str) -> list[Choice]:
    """The inverse of `format_schedule`; empty text is the empty schedule."""
    out = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        c, _, q = item.partition(":")
        out.append((int(c), int(q)))
    return out

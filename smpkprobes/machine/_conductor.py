"""The conductor: which CPU runs next, for how many instructions, and every other coin the
machine tosses.

Every CPU keeps a virtual clock (one ns per instruction).  The default policy is a
discrete-event simulation: the runnable CPU whose clock is furthest behind runs next, for a
quantum drawn from [qmin, qmax] by the machine's seeded generator: a quarter of them
log-uniformly over the whole range, so quanta go down to a handful of instructions (fine
enough for real races), the rest from its top half, thousands (coarse enough to be fast:
see `Conductor.quantum`).  Ties go to the lower CPU id.  Nothing here reads the wall clock or
depends on trio's own scheduling order.

The machine's other random decisions go through the conductor too, as coins: whether a
trap is handled a quantum late ("defer", the window of the removal race), how many quanta
an IPI takes ("ipi"), whether a task is preempted ("preempt").  By default they are drawn
from the same seeded generator, in the same order as always.

Schedules
---------
Whatever the policy, every decision is written down: `conductor.schedule` (also
`Machine.schedule`) is the run's list of `(cpu id, quantum)` choices, in order, and
`conductor.coins` its list of `(kind, value, step)` coins (step: how many quanta had been
chosen when the coin was tossed).  Three policies make the space of interleavings something one can
explore and replay:

  * `Conductor` ("random"): the seeded discrete-event policy above;
  * `PCTConductor` ("pct"): probabilistic concurrency testing, Burckhardt et al. (ASPLOS
    2010): each CPU gets a random priority, the highest-priority runnable CPU runs, and at
    d-1 random change points the running CPU drops below every other.  A bug that needs d
    particular orderings is found with probability at least 1/(n * k^(d-1)) per run;
  * `ReplayConductor`: follows a recording: its choices and its coins.  Wherever the
    recording says nothing, it does the simplest thing: the next CPU in id order for a fixed
    quantum, and every coin 0 (no deferred trap, no IPI delay, no preemption).  So a full
    recording replays the run event for event, and a few choices and coins on top of
    round-robin (what shrinking leaves) are a readable reproducer.

A recording's text form ("0:120,2:16,#2.0=1"): "CPU:QUANTUM" items give the choices in
order, "STEP@CPU:QUANTUM" items give the choice at one step, "#STEP.K=V" gives the K-th
coin tossed at that step the value V (coins left out are 0).  Coins are addressed by step
so that taking one override out of a recording does not move the others.

Choose a policy with `Machine(conductor=...)`: a name ("random", "pct", "pct:D" or
"pct:D:STEPS"), a factory called as `factory(rng, qmin, qmax)`, or a ready `Conductor`.
"""

from __future__ import annotations

import math
import random
from array import array
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

Choice = tuple[int, int]        # (cpu id, quantum in instructions)


class _Log:
    """An append-only list of fixed-shape tuples kept in typed arrays: a recording grows by
    one entry per quantum or coin, so it must cost bytes, not a tuple object (a few
    megabytes per million probe hits instead of a hundred).  Reads as a list of tuples."""

    def __init__(self, codes: str, symbolic: int | None = None):
        self._cols = [array(c) for c in codes]
        self._symbolic = symbolic           # a column of strings, stored as codes
        self._names: list[str] = []
        self._codes: dict[str, int] = {}
        # The two shapes the conductor logs get an append of their own, unrolled: a coin
        # is logged on every trap while trap_delay > 0, and the generic loop below cost
        # 0.53 us a coin, 0.20 us unrolled (2026-12-07, this host).
        ends = [col.append for col in self._cols]
        if symbolic is None and len(ends) == 2:
            a0, a1 = ends

            def append(item: tuple) -> None:
                x, y = item
                a0(x)
                a1(y)
            self.append = append
        elif symbolic == 0 and len(ends) == 3:
            a0, a1, a2 = ends
            names, symbols = self._names, self._codes

            def append(item: tuple) -> None:
                name, y, z = item
                code = symbols.get(name)
                if code is None:
                    code = symbols[name] = len(names)
                    names.append(name)
                a0(code)
                a1(y)
                a2(z)
            self.append = append

    def append(self, item: tuple) -> None:
        for i, (col, v) in enumerate(zip(self._cols, item)):
            if i == self._symbolic:
                code = self._codes.get(v)
                if code is None:
                    code = self._codes[v] = len(self._names)
                    self._names.append(v)
                v = code
            col.append(v)

    def _row(self, j: int) -> tuple:
        row = tuple(col[j] for col in self._cols)
        if self._symbolic is not None:
            k = self._symbolic
            row = (*row[:k], self._names[row[k]], *row[k + 1:])
        return row

    def __len__(self) -> int:
        return len(self._cols[0])

    def __iter__(self):
        for j in range(len(self)):
            yield self._row(j)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self._row(i) for i in range(*j.indices(len(self)))]
        if j < 0:
            j += len(self)
        if not 0 <= j < len(self):
            raise IndexError(j)
        return self._row(j)

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __repr__(self) -> str:
        return repr(list(self))


class Conductor:
    """The seeded random conductor.  Subclasses override `choose`; `pick` records."""

    name = "random"

    def __init__(self, rng: random.Random, qmin: int = 16, qmax: int = 4096):
        if not 1 <= qmin <= qmax:
            raise ValueError(f"bad quantum range {qmin}..{qmax}")
        self.rng = rng
        self.coin_rng = rng          # the machine's generator: coins are tossed with it
        self.qmin, self.qmax = qmin, qmax
        self._lo, self._hi = math.log(qmin), math.log(qmax + 1)
        self.schedule: list[Choice] = _Log("HQ")               # reads as a list
        self.coins: list[tuple[str, int, int]] = _Log("BqQ", symbolic=0)

    # Quanta are a mixture: a share `fine` of them log-uniform over the whole range
    # [qmin, qmax] (half of those are under sqrt(qmin * qmax): the fine interleavings races
    # need), the rest uniform over its top half (the coarse ones that keep the machine
    # fast: a quantum costs several microseconds of host time whatever its length).  With
    # the default 16..4096 the mean is about 2,500 instructions.  One draw per quantum.
    fine = 0.25

    def quantum(self) -> int:
        u = self.rng.random()
        if u < self.fine:
            log_q = self._lo + u / self.fine * (self._hi - self._lo)
            return min(self.qmax, int(math.exp(log_q)))
        lo = max(self.qmin, self.qmax // 2)
        return lo + int((u - self.fine) / (1 - self.fine) * (self.qmax - lo + 1))

    def pick(self, runnable: Sequence) -> tuple[object, int]:
        """`runnable` are CPUs (with `.clock` and `.id`), in id order.  Returns the CPU to
        run and its quantum, and records the choice in `schedule`."""
        cpu, q = self.choose(runnable)
        self.schedule.append((cpu.id, q))
        return cpu, q

    def choose(self, runnable: Sequence) -> tuple[object, int]:
        # The CPU furthest behind; on a tie the first, i.e. the lowest id.
        cpu = runnable[0]
        for c in runnable:
            if c.clock < cpu.clock:
                cpu = c
        return cpu, self.quantum()

    # -- coins ------------------------------------------------------------------------------
    def chance(self, kind: str, p: float) -> bool:
        """True with probability `p` (a trap deferred, a task preempted), recorded.  Draws
        exactly what the machine always drew: `rng.random() < p`."""
        value = int(self.coin_rng.random() < p)
        self.coins.append((kind, value, len(self.schedule)))
        return bool(value)

    def randint(self, kind: str, lo: int, hi: int) -> int:
        """An integer in [lo, hi] (an IPI's delay in quanta), recorded."""
        value = self.coin_rng.randint(lo, hi)
        self.coins.append((kind, value, len(self.schedule)))
        return value

    def describe(self) -> str:
        return self.name

    def recording(self) -> str:
        """This run's choices and non-zero coins, as text for `--replay`."""
        return format_recording(self.schedule, {k: v for k, v in coin_keys(self.coins) if v})


def coin_keys(coins) -> list[tuple[tuple[int, int], int]]:
    """((step, ordinal within the step), value) for each (kind, value, step) coin."""
    out, last, k = [], None, 0
    for _, value, step in coins:
        k = k + 1 if step == last else 0
        last = step
        out.append(((step, k), value))
    return out


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
        # choices do not shift the machine's coins.
        super().__init__(random.Random(rng.getrandbits(64)), qmin, qmax)
        self.coin_rng = rng
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


@dataclass
class Recording:
    """What a `ReplayConductor` follows: choices by step, and coins by (step, ordinal);
    everything else round-robin and 0."""

    choices: dict[int, Choice] = field(default_factory=dict)
    coins: dict[tuple[int, int], int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.choices) + len(self.coins)


class ReplayConductor(Conductor):
    """Follow a recording exactly; where it says nothing, go round-robin with
    `tail_quantum` and toss every coin 0.

    `schedule` is a `Recording`, a list of choices (step i gets the i-th) or a mapping
    {step: choice}.  `policy` is the conductor the run was recorded with: a recorded CPU that
    is not runnable at that step (possible once a recording has been edited, e.g. by
    shrinking) yields to the policy's choice, with the recorded quantum.
    """

    name = "replay"

    def __init__(self, schedule, policy: Conductor, tail_quantum: int = 1024,
                 coins: Mapping[tuple[int, int], int] | None = None):
        super().__init__(policy.rng, policy.qmin, policy.qmax)
        rec = as_recording(schedule)
        self.recorded = rec.choices
        self.recorded_coins = {**rec.coins, **(coins or {})}
        self.end = max(self.recorded, default=-1) + 1
        self.policy = policy
        self.tail_quantum = tail_quantum
        self.divergences = 0
        self._rr = -1
        self._coin_at = (-1, -1)         # (step, ordinal) of the last coin tossed

    def choose(self, runnable: Sequence) -> tuple[object, int]:
        choice = self.recorded.get(len(self.schedule))
        if choice is not None:
            cid, q = choice
            cpu = next((c for c in runnable if c.id == cid), None)
            if cpu is None:
                self.divergences += 1
                cpu, _ = self.policy.choose(runnable)
            return cpu, q
        # Not recorded: a plain round-robin over CPU ids, fixed quantum.
        later = [c for c in runnable if c.id > self._rr]
        cpu = later[0] if later else runnable[0]
        self._rr = cpu.id
        return cpu, self.tail_quantum

    def _next_coin(self) -> tuple[int, int]:
        step, k = self._coin_at
        now = len(self.schedule)
        self._coin_at = (now, k + 1 if step == now else 0)
        return self._coin_at

    def chance(self, kind: str, p: float) -> bool:
        value = 1 if self.recorded_coins.get(self._next_coin(), 0) else 0
        self.coins.append((kind, value, len(self.schedule)))
        return bool(value)

    def randint(self, kind: str, lo: int, hi: int) -> int:
        value = min(hi, max(lo, self.recorded_coins.get(self._next_coin(), lo)))
        self.coins.append((kind, value, len(self.schedule)))
        return value

    @property
    def exhausted(self) -> bool:
        return len(self.schedule) >= self.end

    def describe(self) -> str:
        return (f"replay of {len(self.recorded)} choices and {len(self.recorded_coins)} "
                f"coins over {self.policy.describe()}")


def as_recording(schedule) -> Recording:
    if isinstance(schedule, Recording):
        return schedule
    if isinstance(schedule, str):           # the text of `m.conductor.recording()`
        return parse_recording(schedule)
    if isinstance(schedule, Mapping):
        return Recording({int(i): (int(c), int(q)) for i, (c, q) in schedule.items()})
    return Recording({i: (int(c), int(q)) for i, (c, q) in enumerate(schedule)})


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


def replay_factory(schedule, policy: str = "random", tail_quantum: int = 1024,
                   coins: Mapping[tuple[int, int], int] | None = None
                   ) -> Callable[[random.Random, int, int], Conductor]:
    """A factory for `Machine(conductor=...)` that replays `schedule` (a `Recording`, its
    text as `m.conductor.recording()` gives it, a list of choices or {step: choice}; plus
    `coins`) recorded under `policy`."""
    make = policy_factory(policy)
    return lambda rng, qmin, qmax: ReplayConductor(schedule, make(rng, qmin, qmax),
                                                   tail_quantum, coins)


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


# == text forms ===========================================================================
def format_recording(schedule, coins: Mapping[tuple[int, int], int] | None = None) -> str:
    """"0:120,2:16,1:4096,#2.0=1": choices in order (or "STEP@CPU:Q" when some steps are
    left to round-robin), then the non-zero coins as "#STEP.K=VALUE"."""
    rec = as_recording(schedule)
    allc = {**rec.coins, **(coins or {})}
    ch = rec.choices
    if list(ch) == list(range(len(ch))) or sorted(ch) == list(range(len(ch))):
        items = [f"{c}:{q}" for c, q in (ch[i] for i in range(len(ch)))]
    else:
        items = [f"{i}@{c}:{q}" for i, (c, q) in sorted(ch.items())]
    items += [f"#{st}.{k}={v}" for (st, k), v in sorted(allc.items()) if v]
    return ",".join(items)


def parse_recording(text: str) -> Recording:
    """The inverse of `format_recording`; empty text is the empty recording."""
    dense, rec = [], Recording()
    for item in text.replace(" ", "").replace("\n", "").split(","):
        if not item:
            continue
        if item.startswith("#"):
            key, _, v = item[1:].partition("=")
            st, _, k = key.partition(".")
            rec.coins[(int(st), int(k or 0))] = int(v)
            continue
        step, at, choice = item.rpartition("@")
        c, _, q = choice.partition(":")
        if at:
            rec.choices[int(step)] = (int(c), int(q))
        else:
            dense.append((int(c), int(q)))
    if dense and rec.choices:
        raise ValueError("choices are either all CPU:QUANTUM or all STEP@CPU:QUANTUM")
    if dense:
        rec.choices = dict(enumerate(dense))
    return rec


def format_schedule(schedule) -> str:
    """Choices only: "0:120,2:16,1:4096" (or "STEP@CPU:QUANTUM,..." when sparse)."""
    return format_recording(as_recording(schedule).choices)


def parse_schedule(text: str) -> "list[Choice] | dict[int, Choice]":
    """The choices of a recording's text: a list when dense, else {step: choice}."""
    ch = parse_recording(text).choices
    return [ch[i] for i in range(len(ch))] if sorted(ch) == list(range(len(ch))) else ch

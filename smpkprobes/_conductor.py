"""The conductor: which CPU runs next, and for how many instructions.

Every CPU keeps a virtual clock (one ns per instruction).  The default policy is a
discrete-event simulation: the runnable CPU whose clock is furthest behind runs next, for a
quantum drawn log-uniformly from [qmin, qmax] by the machine's seeded generator, so quanta
range from a handful of instructions (fine enough for real races) to thousands (coarse
enough to be fast).  Ties go to the lower CPU id.  Nothing here reads the wall clock or
depends on trio's own scheduling order.
"""

from __future__ import annotations

import math
import random
from typing import Sequence


class Conductor:
    """The seeded random conductor."""

    name = "random"

    def __init__(self, rng: random.Random, qmin: int = 16, qmax: int = 4096):
        if not 1 <= qmin <= qmax:
            raise ValueError(f"bad quantum range {qmin}..{qmax}")
        self.rng = rng
        self.qmin, self.qmax = qmin, qmax
        self._lo, self._hi = math.log(qmin), math.log(qmax + 1)

    def quantum(self) -> int:
        return min(self.qmax, int(math.exp(self.rng.uniform(self._lo, self._hi))))

    def pick(self, runnable: Sequence) -> tuple[object, int]:
        """`runnable` are CPUs (with `.clock` and `.id`), in id order."""
        cpu = min(runnable, key=lambda c: (c.clock, c.id))
        return cpu, self.quantum()

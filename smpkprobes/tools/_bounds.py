"""Host-side bounds of one scenario run: wall-clock seconds and resident memory.

A livelocked run (CPUs busy for ever, a grace period that never ends, a trap loop that
grows the trace) must end as a reported failure, not hang `make test` or a stress seed.
The bounds watch from outside the simulation: every `CHECK_EVERY` quanta, an observer of
`QuantumEnded` reads the host's monotonic clock and the process's resident set; a watchdog
task covers a hang in which no quantum runs at all.  When a bound is passed, the machine is
stopped with `panic()`: its CPU tasks are cancelled, and host code waiting on it, even in a
section shielded from cancellation (an unregistration between disarm and free), is woken
with `MachinePanic`, so the run unwinds and is reported.

Nothing here changes the run while it is within its bounds: the observer reads, and the
simulation never sees the wall clock.
"""

from __future__ import annotations

import os
import time

import trio

from ..machine._events import QuantumEnded

CHECK_EVERY = 256          # quanta between two looks (a quantum is microseconds of host time)
BOUND_KIND = "bound exceeded"


def rss_mb() -> float:
    """This process's resident set, in MB (Linux /proc; elsewhere the peak, from rusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 2**10


class Bounds:
    """`wall`: seconds of host time; `memory`: MB of resident-set growth since `install`.
    Either may be None (no bound)."""

    def __init__(self, wall: float | None = None, memory: float | None = None):
        self.wall, self.memory = wall, memory
        self.exceeded: str | None = None
        self._quanta = 0

    def install(self, machine, scope: trio.CancelScope) -> None:
        """Watch `machine` (an SMPMachine); `scope` is cancelled with it."""
        if self.wall is None and self.memory is None:
            return
        self._machine = machine
        self._scope = scope
        self._deadline = time.monotonic() + self.wall if self.wall is not None else None
        self._rss0 = rss_mb()
        machine.events.subscribe(QuantumEnded, self._check)

    async def watchdog(self) -> None:
        """A hang in which no quantum ends (every task blocked: a grace period that waits for
        CPUs with nothing to run): stop the machine a little after the wall bound, so that a
        busy run is still reported by the quantum check first."""
        if self.wall is None:
            return
        await trio.sleep(self.wall + max(2.0, self.wall / 2))
        if not self.exceeded:
            self._stop(f"{BOUND_KIND}: no progress within {self.wall:g} s of wall time (a "
                       f"hang, or a livelock that starves the CPUs)")

    def _stop(self, why: str) -> None:
        self.exceeded = why
        self._machine.panic(why)
        self._scope.cancel()

    def _check(self, _event) -> None:
        self._quanta += 1
        if self._quanta % CHECK_EVERY or self.exceeded:
            return
        if self._deadline is not None and time.monotonic() > self._deadline:
            self._stop(f"{BOUND_KIND}: still running after {self.wall:g} s of wall time (a "
                       f"hang or a livelock?)")
        elif self.memory is not None and rss_mb() - self._rss0 > self.memory:
            self._stop(f"{BOUND_KIND}: the run grew by more than {self.memory:g} MB of "
                       f"memory (a livelock filling the trace?)")

"""Grace periods (KPROBES.md section 5): `synchronize` waits until every online CPU has
passed a quiescent state.  A mixin of `SMPMachine`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from . import _memory as mem

if TYPE_CHECKING:    # pragma: no cover
    from ._cpu import CPU


class GracePeriods:
    """The grace period part of `SMPMachine` (see `_machine`)."""

    def quiescent(self, cpu: CPU) -> bool:
        """Not in a probe handler, not between a trap and the end of its single-step, not in
        a boosted slot or an optimized probe's detour."""
        if cpu.current is None and not cpu.deferred_trap:
            return True
        pc = cpu.pc
        return cpu.preemptible() and pc not in mem.SLOTS and pc not in mem.OPTINSN

    async def synchronize(self) -> None:
        """Wait for one grace period: every online CPU passes a quiescent state."""
        remaining = {c.id for c in self.cpus if c.online and not self.quiescent(c)}
        self._gp_begun += 1
        gp = self._gp_begun
        self.trace_event("gp_begin", gp, self._now)
        waiter = [remaining, trio.Event(), self._now]     # [2]: when the last CPU acked
        if remaining:
            self._gp_waiters.append(waiter)
            await waiter[1].wait()
        self._c.grace_periods += 1
        self.trace_event("gp", self._c.grace_periods, gp, waiter[2])

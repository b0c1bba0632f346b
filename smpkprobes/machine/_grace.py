"""Grace periods (KPROBES.md section 5): `synchronize` waits until every online CPU has
passed a quiescent state.  A mixin of `SMPMachine`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:    # pragma: no cover
    from ._cpu import CPU


class GracePeriods:
    """The grace period part of `SMPMachine` (see `_machine`)."""

    def quiescent(self, cpu: CPU) -> bool:
        """Idle, or preemptible and not in text registered as unquiescent: so not in a
        probe handler (preemption is disabled there), not between a trap and the end of
        its single-step, not in a boosted instruction slot."""
        if cpu.current is None and not cpu.deferred_trap:
            return True
        if not cpu.preemptible() or self._in_unquiescent_text(cpu):
            return False
        if self._rcu_tasks_text:
            pc = cpu.pc
            for start, end in self._rcu_tasks_text:
                if start <= pc < end:
                    return False
        return True

    def register_unquiescent_text(self, start: int, end: int, preemptible: bool = False) -> None:
        """A CPU executing in [start, end) is not quiescent, and not preempted there either
        (the probe core's instruction slots, left by a jump back after a boosted step);
        with `preemptible`, a task may be preempted there (optprobe detours, which the
        optimizer waits for as RCU tasks does)."""
        (self._rcu_tasks_text if preemptible else self._unquiescent_text).append((start, end))

    def preempted_task_pcs(self) -> list[int]:
        """Where each runnable task that is switched out will resume (RCU tasks' holdouts
        are found among them), in run-queue order."""
        pc_id = self.backend.registers[self.backend.cc.pc_reg]
        return [t.context.reg_read(pc_id) for t in self._runq if t.context is not None]

    def completed_grace_periods(self) -> int:
        return self._c.grace_periods

    def _in_unquiescent_text(self, cpu: CPU) -> bool:
        ranges = self._unquiescent_text
        if not ranges:
            return False
        pc = cpu.pc
        for start, end in ranges:
            if start <= pc < end:
                return True
        return False

    async def synchronize(self) -> None:
        """Wait for one grace period: every online CPU passes a quiescent state."""
        self._check_panic()
        remaining = {c.id for c in self.cpus if c.online and not self.quiescent(c)}
        self._gp_begun += 1
        gp = self._gp_begun
        self.trace_event("gp_begin", gp, self._now)
        waiter = [remaining, trio.Event(), self._now]     # [2]: when the last CPU acked
        if remaining:
            self._gp_waiters.append(waiter)
            await waiter[1].wait()
        self._check_panic()
        self._c.grace_periods += 1
        self.trace_event("gp", self._c.grace_periods, gp, waiter[2])

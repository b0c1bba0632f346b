"""The hypercalls the guest kernel makes (console_write, msleep, schedule, do_exit,
ktime_get_ns, and the stubs a task or a nested call returns to).  A mixin of `SMPMachine`."""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from ._task import TaskState

if TYPE_CHECKING:    # pragma: no cover
    from ._cpu import CPU

NS_PER_MS = 1_000_000


class Hypercalls:
    """The hypercall part of `SMPMachine` (see `_machine`)."""

    def _ret(self, cpu: CPU, value: int | None) -> None:
        self.backend.cc.emulate_return(cpu, value)

    def _hc_console_write(self, cpu: CPU) -> None:
        cc = self.backend.cc
        buf, n = cc.arg(cpu, 0), cc.arg(cpu, 1)
        text = self._console_lines[cpu.id] + self.memory.read(buf, n).decode("latin-1")
        *lines, self._console_lines[cpu.id] = text.split("\n")
        self.printk_log.extend(lines)
        for line in lines:
            self.trace_event("printk", cpu.id, line, cpu.clock + cpu.intra)
        self._ret(cpu, n)

    def _hc_ktime_get_ns(self, cpu: CPU) -> None:
        self._ret(cpu, cpu.now_ns())

    def _blocking(self, cpu: CPU, what: str) -> None:
        if cpu.nesting or cpu.preempt_count:
            raise RuntimeError(f"BUG: scheduling while atomic: {what} called with "
                               f"preemption disabled (from a probe handler?)")

    def _hc_msleep(self, cpu: CPU) -> None:
        self._blocking(cpu, "msleep")
        ms = self.backend.cc.arg(cpu, 0)
        self._ret(cpu, 0)
        task = self._switch_out(cpu)
        task.state = TaskState.SLEEPING
        task.wake_at = cpu.now_ns() + ms * NS_PER_MS
        self._seq += 1
        heapq.heappush(self._sleepers, (task.wake_at, self._seq, task))
        self.trace_event("sleep", cpu.id, task.pid, task.wake_at, cpu.clock + cpu.intra)

    def _hc_schedule(self, cpu: CPU) -> None:
        self._blocking(cpu, "schedule")
        self._ret(cpu, 0)
        task = self._switch_out(cpu)
        self._make_runnable(task, cpu.now_ns())

    def _hc_do_exit(self, cpu: CPU) -> None:
        self._blocking(cpu, "do_exit")
        code = self.backend.sign_extend(self.backend.cc.arg(cpu, 0))
        self._finish(cpu, code)

    def _hc_task_return(self, cpu: CPU) -> None:
        self._finish(cpu, self.backend.sign_extend(cpu.reg_read(self.backend.cc.ret_reg)))

    def _hc_call_return(self, cpu: CPU) -> None:
        cpu.stop_requested = True

"""Oopses: a guest fault or a failed check kills the current task with an oops report (the
registers and a call trace); the machine and the other CPUs go on.  A mixin of `SMPMachine`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import unicorn

from .._errors import OopsRecord
from ._events import TaskOopsed

if TYPE_CHECKING:    # pragma: no cover
    from ._cpu import CPU
    from ._task import Task


class Oopses:
    """The oops part of `SMPMachine` (see `_machine`)."""

    def _on_fault(self, cpu: CPU, err: unicorn.UcError) -> None:
        if self._fault_fixup is not None:
            try:
                if self._fault_fixup(cpu, err):
                    return
            except BaseException as exc:
                self.on_hook_exception(cpu, exc)
                return
        self.kill_current(cpu, f"guest fault: {err}")

    def kill_current(self, cpu: CPU, cause: str) -> None:
        """Kill the task running on `cpu` with an oops; the machine and the other CPUs go
        on."""
        task = cpu.current
        if task is None:
            return
        record = self._oops_record(cpu, task, cause)
        self.oopses.append(record)
        self._c.oopses += 1
        self.printk_log.extend(record.report.splitlines())
        self.events.publish(TaskOopsed(cpu))
        cpu.preempt_count = 0
        cpu.deferred_trap = False
        self._finish(cpu, None, record)
        cpu.stop_requested = True

    def _oops_record(self, cpu: CPU, task: Task, cause: str) -> OopsRecord:
        b = self.backend
        ip = cpu.pc
        regs = tuple((name, cpu.reg_read(name)) for name in b.registers)
        try:
            trace = cpu.regs().stack_trace()[1:]
        except Exception:         # a corrupt stack must not hide the oops itself
            trace = []
        call_trace = tuple(self.format_addr(a) for a in trace)
        w = b.bits // 4
        lines = [f"Oops: {cause}",
                 f"CPU: {cpu.id} PID: {task.pid} Comm: {task.comm}",
                 f"{b.cc.pc_reg.upper()}: {self.format_addr(ip)} ({ip:#0{w + 2}x})"]
        row = []
        for name, val in regs:
            row.append(f"{name.upper()}: {val:0{w}x}")
            if len(row) == 3:
                lines.append(" ".join(row))
                row = []
        if row:
            lines.append(" ".join(row))
        lines.append("Call Trace:")
        lines.extend(f" {c}" for c in call_trace)
        return OopsRecord(task.pid, task.comm, cpu.id, ip, self.format_addr(ip), cause, regs,
                          call_trace, "\n".join(lines))

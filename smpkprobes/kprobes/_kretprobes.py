"""Return probes: the entry pre_handler that takes an instance from the pool and hijacks
the return address, the trampoline handler, and the instances in flight per task
(`kretprobe_inst_table`).  A mixin of
`KprobesSubsystem`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._errors import KprobeError
from ._probes import (KPROBE_FLAG_DISABLED, KPROBE_FLAG_GONE, KRETPROBE_MAX_DATA_SIZE, Kprobe,
                      Kretprobe)
from ..machine._services import HANDLED, Regs, TaskExited, TrapResult, resume_at
from ._events import KretprobeRegistered
from ._state import _HIT_ACTIVE, KprobeCtlblk
from ._validate import check_not_registered

# kprobe_disabled(): a probe whose handlers do not run.
_OFF = KPROBE_FLAG_DISABLED | KPROBE_FLAG_GONE

if TYPE_CHECKING:    # pragma: no cover
    from ..machine._cpu import CPU


class Kretprobes:
    """The kretprobe part of `KprobesSubsystem` (see `_core`)."""

    async def _register_kretprobe(self, rp: Kretprobe) -> None:
        # Checked before the pool is touched: rebuilding it would strand the instances of
        # the live registration (their returns could never be recycled).
        check_not_registered(rp.kp, self)
        if rp.maxactive <= 0:
            n = self._kernel.ncpus
            rp.maxactive = max(10, 2 * n) if self._kernel.preempt else n
        rp.kp.pre_handler = self.pre_handler_kretprobe
        # An oversized data_size is refused (E2BIG) by _register, in the order of
        # KPROBES.md section 2; do not try to allocate it first.
        size = rp.data_size if 0 <= rp.data_size <= KRETPROBE_MAX_DATA_SIZE else 0
        rp.pool.fill(rp.maxactive, size, self._kernel.ncpus)
        rp.nmissed = 0
        try:
            await self._register(rp.kp)
        except KprobeError:
            rp.pool.free = []
            raise
        self.events.publish(KretprobeRegistered(rp))

    def pre_handler_kretprobe(self, p: Kprobe, regs: Regs) -> int:
        """The entry: take an instance from the pool, hijack the return address."""
        rp: Kretprobe = p._owner
        cpu = regs.cpu
        # Taking an instance happens inside the trap, with preemption disabled: it is
        # atomic with respect to every other simulated CPU.
        ri = rp.pool.take(cpu.id)
        if ri is None:
            rp.nmissed += 1
            self._kernel.trace_event("rp_miss", cpu.id, p.addr, cpu.clock + cpu.intra)
            return 0
        ri.rp = rp
        ri.task = cpu.current
        ri.cpu = cpu.id
        ri.ret_addr = self._backend.cc.get_return_address(regs)
        if rp.entry_handler is not None:
            try:
                skip = rp.entry_handler(ri, regs)
            except BaseException:
                rp.pool.recycle(ri)
                raise
            if skip:
                rp.pool.recycle(ri)
                return 0
        self._backend.cc.set_return_address(regs, self._trampoline)
        table = self.kretprobe_inst_table
        stack = table.get(cpu.current)
        if stack is None:
            stack = table[cpu.current] = []
        stack.append(ri)
        return 0

    def trampoline_handler(self, cpu: "CPU", kcb: KprobeCtlblk) -> TrapResult:
        """The trampoline's breakpoint trapped (kprobe_int3_handler): see
        kretprobe_trampoline_handler."""
        resume = self.kretprobe_trampoline_handler(cpu, kcb)
        return HANDLED if resume is None else resume_at(resume)

    def kretprobe_trampoline_handler(self, cpu: "CPU", kcb: KprobeCtlblk) -> int | None:
        """A function with a return probe returned (into the trampoline): run the handlers
        of its instances.  Returns the real return address, where the CPU goes on, or None
        when the task died (the trampoline is entered by a trap, or by a code hook while
        jump optimization is on: _optprobe's kretprobe_trampoline_callback)."""
        task = cpu.current
        stack = self.kretprobe_inst_table.get(task) if task is not None else None
        if not stack:
            msg = (f"kretprobe BUG!: Processing kretprobe trampoline @ {self._trampoline:#x} "
                   f"with no instance for {task!r}")
            self.simulation_errors.append(msg)
            self._kernel.printk(msg)
            self._kernel.kill_current(cpu, msg)
            return None
        # The real return address: the first instance (LIFO) not itself returning to the
        # trampoline (several kretprobes on one function chain through it).
        tramp = self._trampoline
        ri = stack.pop()
        if ri.ret_addr != tramp or not stack:
            batch = (ri,)                   # one kretprobe on the function: the usual case
        else:
            batch = [ri]
            while stack:
                ri = stack.pop()
                batch.append(ri)
                if ri.ret_addr != tramp:
                    break
        correct = ri.ret_addr
        self._trace.append(("ret", cpu.id, correct, cpu.clock + cpu.intra))
        if len(batch) > 1:
            for ri in batch:
                ri.ret_addr = correct     # the chained ones recorded the trampoline at entry
        regs = self._Regs(cpu, correct)      # the handlers see regs.ip == the real return
        cpu.preempt_count += 1
        kcb.current_kprobe = self._trampoline_probe   # probes hit in the handlers are missed
        kcb.kprobe_status = _HIT_ACTIVE
        try:
            for ri in batch:
                rp = ri.rp
                if rp is None:
                    continue
                if rp.handler is not None:
                    kp = rp.kp
                    if not kp._registered:
                        self.stale_handlers.append((kp.addr, rp, "return handler"))
                    if not kp.flags & _OFF:
                        try:
                            rp.handler(ri, regs)
                        except BaseException as exc:
                            for later in batch[batch.index(ri):]:
                                if later.rp is not None:
                                    later.rp.pool.recycle(later)
                            self.kprobe_fault_handler(cpu, kp, regs, exc)
                            break
                rp.pool.recycle(ri)
        except BaseException:
            if kcb.current_kprobe is not None:
                self._finish(cpu, kcb, regs, resume=regs.read("ip"))
            raise
        if kcb.current_kprobe is None:
            return None                      # the task died in a handler
        # (regs.ip is the real return address unless a handler wrote it.)
        resume = regs.read("ip") if regs._dirty else correct
        self._finish(cpu, kcb, regs, resume, pc=resume)
        return resume

    def kprobe_flush_task(self, event: TaskExited) -> None:
        """The task is dead: its instances go back to their pools."""
        for ri in self.kretprobe_inst_table.pop(event.task, ()):
            if ri.rp is not None:
                ri.rp.pool.recycle(ri)

    def _cleanup_kretprobe(self, rp: Kretprobe) -> None:
        rp.pool.orphan_all()

    def _resolve_return_address(self, cpu: "CPU", addr: int, depth: int) -> tuple[int, int]:
        if addr != self._trampoline or cpu.current is None:
            return addr, depth
        stack = self.kretprobe_inst_table.get(cpu.current, ())
        while depth < len(stack):
            ri = stack[-1 - depth]
            depth += 1
            if ri.ret_addr != self._trampoline:
                return ri.ret_addr, depth
        return addr, depth

"""Return probes: the entry pre_handler that takes an instance from the pool and hijacks
the return address, the trampoline handler, and the per-task instance list.  A mixin of
`KprobesSubsystem`."""

from __future__ import annotations

import errno as E
from typing import TYPE_CHECKING

from .._errors import KprobeError
from ..machine._regs import Regs
from ._probes import (KPROBE_FLAG_DISABLED, KRETPROBE_MAX_DATA_SIZE, Kprobe, Kretprobe,
                      KretprobeInstance)
from ._state import KprobeCtlblk, Status

if TYPE_CHECKING:    # pragma: no cover
    from ..machine._cpu import CPU


class Kretprobes:
    """The kretprobe part of `KprobesSubsystem` (see `_core`)."""

    async def _register_kretprobe(self, rp: Kretprobe) -> None:
        if rp.kp._registered:
            # Checked before the pool is touched: rebuilding it would strand the instances
            # of the live registration (their returns could never be recycled).
            raise KprobeError(E.EINVAL, f"{rp!r} is already registered")
        if rp.maxactive <= 0:
            n = self._m.ncpus
            rp.maxactive = max(10, 2 * n) if self._m.preempt else n
        rp.kp.pre_handler = self._pre_handler_kretprobe
        # An oversized data_size is refused (E2BIG) by _register, in the order of
        # KPROBES.md section 2; do not try to allocate it first.
        size = rp.data_size if 0 <= rp.data_size <= KRETPROBE_MAX_DATA_SIZE else 0
        rp._free = [KretprobeInstance(rp, size) for _ in range(rp.maxactive)]
        rp._used = []
        rp._entries = rp._taken = rp._returned = rp._high = 0
        rp._taken_per_cpu = [0] * self._m.ncpus
        rp.nmissed = 0
        try:
            await self._register(rp.kp)
        except KprobeError:
            rp._free = []
            raise

    def _pre_handler_kretprobe(self, p: Kprobe, regs: Regs) -> int:
        rp: Kretprobe = p._owner
        rp._entries += 1
        cpu = regs.cpu
        # Taking an instance happens inside the trap, with preemption disabled: it is
        # atomic with respect to every other simulated CPU.
        if not rp._free:
            rp.nmissed += 1
            self._m.trace_event("rp_miss", cpu.id, p.addr, cpu.clock + cpu.intra)
            return 0
        ri = rp._free.pop()
        rp._used.append(ri)
        rp._taken += 1
        rp._taken_per_cpu[cpu.id] += 1
        rp._high = max(rp._high, len(rp._used))
        ri.rp = rp
        ri.task = cpu.current
        ri.cpu = cpu.id
        ri.ret_addr = self._backend.cc.get_return_address(regs)
        if rp.entry_handler is not None:
            try:
                skip = rp.entry_handler(ri, regs)
            except BaseException:
                rp._recycle(ri)
                raise
            if skip:
                rp._recycle(ri)
                return 0
        self._backend.cc.set_return_address(regs, self._trampoline)
        cpu.current.kretprobe_instances.append(ri)
        return 0

    def _trampoline_handler(self, cpu: "CPU", kcb: KprobeCtlblk) -> bool | int:
        task = cpu.current
        stack = task.kretprobe_instances if task is not None else []
        if not stack:
            msg = (f"kretprobe BUG!: Processing kretprobe trampoline @ {self._trampoline:#x} "
                   f"with no instance for {task!r}")
            self.simulation_errors.append(msg)
            self._m.printk_log.append(msg)
            self._m.kill_current(cpu, msg)
            return True
        # The real return address: the first instance (LIFO) not itself returning to the
        # trampoline (several kretprobes on one function chain through it).
        n = 0
        while n < len(stack):
            n += 1
            if stack[-n].ret_addr != self._trampoline:
                break
        batch = [stack.pop() for _ in range(n)]
        correct = batch[-1].ret_addr
        self._trace.append(("ret", cpu.id, correct, cpu.clock + cpu.intra))
        for ri in batch:
            ri.ret_addr = correct     # the chained ones recorded the trampoline at entry
        regs = self._Regs(cpu, correct)      # the handlers see regs.ip == the real return
        cpu.preempt_count += 1
        kcb.current = self._trampoline_site      # probes hit in the handlers are missed
        kcb.status = Status.HIT_ACTIVE
        try:
            for ri in batch:
                rp = ri.rp
                if rp is not None and rp.handler is not None:
                    if not rp.kp._registered:
                        self.stale_handlers.append((rp.kp.addr, rp, "return handler"))
                    if not rp.kp.flags & KPROBE_FLAG_DISABLED:
                        try:
                            rp.handler(ri, regs)
                        except BaseException as exc:
                            for later in batch[batch.index(ri):]:
                                if later.rp is not None:
                                    later.rp._recycle(later)
                            self._handler_fault(cpu, rp.kp, regs, exc)
                            break
                if rp is not None:
                    rp._recycle(ri)
        except BaseException:
            if kcb.current is not None:
                self._finish(cpu, kcb, regs, resume=regs.read("ip"))
            raise
        if kcb.current is None:
            return True                      # the task died in a handler
        resume = regs.read("ip")
        self._finish(cpu, kcb, regs, resume, pc=resume)
        return resume                        # for the CPU's hook to set (see _kprobe_handler)

    def _kprobe_flush_task(self, task) -> None:
        for ri in task.kretprobe_instances:
            if ri.rp is not None:
                ri.rp._recycle(ri)
        task.kretprobe_instances.clear()

    def _cleanup_kretprobe(self, rp: Kretprobe) -> None:
        for ri in rp._used:
            ri.rp = None            # orphaned: the task still returns, no handler runs
        rp._used = []
        rp._free = []

    def _resolve_return_address(self, cpu: "CPU", addr: int, depth: int) -> tuple[int, int]:
        if addr != self._trampoline or cpu.current is None:
            return addr, depth
        stack = cpu.current.kretprobe_instances
        while depth < len(stack):
            ri = stack[-1 - depth]
            depth += 1
            if ri.ret_addr != self._trampoline:
                return ri.ret_addr, depth
        return addr, depth

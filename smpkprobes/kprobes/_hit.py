"""The hit path, run inside a Unicorn callback: kprobe_int3_handler, single-stepping out of
line (or simulated), post handlers, reentry and faults.  A mixin of `KprobesSubsystem`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import unicorn

from smpkprobes.cpus import StepKind

from ..machine import _memory as mem
from ..machine._regs import Regs
from ._probes import KPROBE_FLAG_DISABLED, Kprobe, _JprobeReturn
from ._state import _HIT_ACTIVE, _NONE, _REENTER, KprobeCtlblk, Status, _Site

if TYPE_CHECKING:    # pragma: no cover
    from ..machine._cpu import CPU

# trapnr passed to fault handlers for a Python exception raised by a handler.
TRAP_HANDLER_EXCEPTION = -1


class HitPath:
    """The hit path of `KprobesSubsystem` (see `_core`)."""

    # == the hit path (runs inside a Unicorn callback) ====================================
    def _kprobe_handler(self, cpu: "CPU", addr: int) -> bool | int:
        """kprobe_int3_handler: a breakpoint trap at `addr`.  Returns False if it is no
        breakpoint of ours, else True, or the address to resume at for the CPU's hook to
        set (see SMPMachine.trap_handler).

        A hit on a registered probe is the hot path, written out in one function on
        purpose (every call and attribute chain here is paid on each hit): the normal hit,
        its pre_handlers and, when allowed, the boosted step.  Everything else goes to
        `_other_trap`."""
        site = self._table.get(addr)
        if site is None:
            return self._other_trap(cpu, addr)
        children = site.children
        if not children:
            return self._other_trap(cpu, addr)
        if site.detour is not None:
            return site.detour          # setup_detour_execution: the stub's hook counts it
        self.traps += 1
        kcb: KprobeCtlblk = cpu.kprobe_ctlblk
        if kcb.current is not None:
            self._reenter_kprobe(cpu, kcb, site)
            return True
        cpu.preempt_count += 1
        kcb.current = site
        kcb.status = _HIT_ACTIVE
        self.hits += 1
        # The trace keeps its events for ever, and much of what a hit costs is the memory
        # they take: name the site's own address object rather than the int made from
        # this trap's PC, and share the timestamp object between the hit and its step.
        addr = site.addr
        trace = self._trace
        t = cpu.clock + cpu.intra
        hit = ("hit", cpu.id, addr, t)
        trace.append(hit)
        regs = self._Regs(cpu, addr)
        for child in children:
            if not child._registered:
                self.stale_handlers.append((addr, child, "pre_handler"))
            if child.flags & KPROBE_FLAG_DISABLED or child.pre_handler is None:
                continue
            try:
                ret = child.pre_handler(child, regs)
            except _JprobeReturn:
                ret = 0
            except BaseException as exc:
                if not self._handler_fault(cpu, child, regs, exc):
                    return True
                continue
            if kcb.current is None:
                return True               # the task died inside the handler
            if ret:
                # The handler redirected execution: no single-step (and for a jprobe, the
                # CPU is sent to the jprobe's entry with this probe still current).
                if kcb.jprobe_saved is not None:
                    regs.flush()
                    cpu.pc = regs.read("ip")
                    return True
                self._finish(cpu, kcb, regs, resume=regs.read("ip"))
                return True
        if site.boostable and kcb.status is not _REENTER:
            for child in children:
                if child.post_handler is not None and not child.flags & KPROBE_FLAG_DISABLED:
                    break
            else:
                # Boosted (see _prepare_singlestep), written out here.
                t_ss = cpu.clock + cpu.intra
                if t_ss == t:
                    t_ss = t
                if trace and trace[-1] is hit:
                    # Nothing traced since the hit: one "boost" event stands for both.
                    trace[-1] = ("boost", hit[1], addr, t, t_ss)
                else:
                    trace.append(("ss", cpu.id, addr, t_ss, "boost"))
                site.boost_used = True
                if regs._dirty:
                    regs.flush_except_pc()
                kcb.current = None
                kcb.status = _NONE
                kcb.jprobe_saved = None
                cpu.preempt_count -= 1
                return site.slot + self._slot_stride
        return self._prepare_singlestep(cpu, kcb, site, regs) or True

    def _other_trap(self, cpu: "CPU", addr: int) -> bool:
        """A breakpoint trap at no registered probe: the end of a single-step, the kretprobe
        trampoline, jprobe_return(), or a stray trap whose probe is already gone."""
        kcb: KprobeCtlblk = cpu.kprobe_ctlblk
        if self._slot_lo <= addr < self._slot_hi:
            if kcb.status in (Status.HIT_SS, Status.REENTER):
                if addr == kcb.ss_addr:
                    site = kcb.current
                    self._post_kprobe_handler(cpu, kcb, site.addr + site.plan.length)
                    return True
                # A step with several exits (a conditional branch: taken or not).
                site = kcb.current
                resume = site.plan.exit_resume(addr - site.slot) \
                    if site is not None and site.slot is not None else None
                if resume is not None:
                    self._post_kprobe_handler(cpu, kcb, resume)
                    return True
            return False
        if addr == self._trampoline:
            return self._trampoline_handler(cpu, kcb)
        if addr == self._jprobe_return and kcb.jprobe_saved is not None:
            self._longjmp(cpu, kcb)
            return True
        code = self._m.memory.peek(addr, len(self._bp))
        if not self._backend.is_trap_insn(code):
            # The probe was removed after this CPU trapped: re-execute the original
            # instruction.  The trap serialises this CPU, so drop its stale translation.
            cpu.flush_tb(addr, addr + len(self._bp))
            cpu.pc = addr
            self._m.count_stray_trap()
            self._m.trace_event("stray", cpu.id, addr, cpu.clock + cpu.intra)
            return True
        return False

    def _prepare_singlestep(self, cpu: "CPU", kcb: KprobeCtlblk, site: _Site,
                            regs: Regs) -> int | None:
        """Step the probed instruction: returns the address the CPU goes on at (a slot),
        for the caller to set, or None when the step is over already (simulated)."""
        plan = site.plan
        reenter = kcb.status is Status.REENTER
        if plan.kind is StepKind.SIMULATE:
            self._trace.append(("ss", cpu.id, site.addr, cpu.clock + cpu.intra, "simulate"))
            if not reenter:
                kcb.status = Status.HIT_SS
            regs.write("ip", site.addr)
            plan.simulate(regs)
            self._run_post_handlers(cpu, kcb, site, regs)
            return None
        if plan.boostable and not site.has_post_handler() and not reenter:
            # Boosted: the slot jumps back by itself.  Preemption is enabled again before
            # the CPU enters the slot; grace periods still wait for it to leave (PC check).
            self._trace.append(("ss", cpu.id, site.addr, cpu.clock + cpu.intra, "boost"))
            site.boost_used = True
            regs.flush_except_pc()
            kcb.current = None
            kcb.status = Status.NONE
            kcb.jprobe_saved = None
            cpu.preempt_count -= 1
            return site.slot + self._slot_stride
        self._trace.append(("ss", cpu.id, site.addr, cpu.clock + cpu.intra, "slot"))
        if not reenter:
            kcb.status = Status.HIT_SS
        kcb.ss_addr = site.slot + plan.length
        regs.flush_except_pc()
        return site.slot

    def _post_kprobe_handler(self, cpu: "CPU", kcb: KprobeCtlblk, resume: int) -> None:
        site = kcb.current
        if kcb.status is Status.REENTER:
            # (A normal step's end is its "done": post handlers take no virtual time.)
            self._trace.append(("ssdone", cpu.id, site.addr, cpu.clock + cpu.intra))
            cpu.pc = resume
            self._restore_previous_kprobe(kcb)
            return
        regs = self._Regs(cpu, resume)
        cpu.pc = resume
        self._run_post_handlers(cpu, kcb, site, regs, resume)

    def _run_post_handlers(self, cpu: "CPU", kcb: KprobeCtlblk, site: _Site, regs: Regs,
                           pc: int | None = None) -> None:
        if kcb.status is Status.REENTER:
            regs.flush()
            cpu.pc = regs.read("ip")
            self._restore_previous_kprobe(kcb)
            return
        kcb.status = Status.HIT_SSDONE
        for child in site.children:
            if not child._registered:
                self.stale_handlers.append((site.addr, child, "post_handler"))
            if child.flags & KPROBE_FLAG_DISABLED or child.post_handler is None:
                continue
            try:
                child.post_handler(child, regs, 0)
            except BaseException as exc:
                if not self._handler_fault(cpu, child, regs, exc):
                    return
        self._finish(cpu, kcb, regs, resume=regs.read("ip"), pc=pc)

    def _finish(self, cpu: "CPU", kcb: KprobeCtlblk, regs: Regs, resume: int,
                pc: int | None = None) -> None:
        """The probe is done on this CPU: resume at `resume`.  `pc` is where the caller has
        put the PC, or will (the end of a step, set before the post_handlers ran, so that
        they and an oops see it; or the address a trap handler returns for the CPU's hook
        to set): when it is `resume`, the CPU is not written here, a call into Unicorn
        the stepped path would otherwise pay twice on every hit."""
        site = kcb.current
        self._trace.append(("done", cpu.id, site.addr if site is not None else 0,
                            cpu.clock + cpu.intra))
        if regs._dirty:
            regs.flush_except_pc()
        if resume != pc:
            cpu.pc = resume
        kcb.reset()
        cpu.preempt_count -= 1

    def _reenter_kprobe(self, cpu: "CPU", kcb: KprobeCtlblk, site: _Site) -> None:
        if kcb.status is Status.REENTER:
            msg = (f"Unrecoverable kprobe detected at {self._m.format_addr(site.addr)} "
                   f"({', '.join(repr(c) for c in site.children)})")
            self.unrecoverable += 1
            self.simulation_errors.append(msg)
            self._m.printk_log.append(msg)
            self._m.kill_current(cpu, msg)
            return
        for child in site.children:
            child.nmissed += 1
        self.missed += 1
        self._m.trace_event("miss", cpu.id, site.addr, cpu.clock + cpu.intra)
        kcb.prev = (kcb.current, kcb.status, kcb.ss_addr)
        kcb.current = site
        kcb.status = Status.REENTER
        regs = self._Regs(cpu, site.addr)
        pc = self._prepare_singlestep(cpu, kcb, site, regs)
        if pc is not None:
            cpu.pc = pc

    def _restore_previous_kprobe(self, kcb: KprobeCtlblk) -> None:
        kcb.current, status, kcb.ss_addr = kcb.prev
        kcb.prev = None
        kcb.status = status

    # -- faults ---------------------------------------------------------------------------
    def _handler_fault(self, cpu: "CPU", child: Kprobe, regs: Regs, exc: BaseException) -> bool:
        """A handler raised: count a miss, ask the fault_handler, else oops the task.
        Returns True if execution may go on."""
        child.nmissed += 1
        trapnr = (self._backend.page_fault_trapnr if type(exc).__name__ == "GuestFault"
                  else TRAP_HANDLER_EXCEPTION)
        if child.fault_handler is not None:
            try:
                if child.fault_handler(child, regs, trapnr):
                    return True
            except BaseException as exc2:
                exc = exc2
        where = self._m.format_addr(child.addr) if child.addr is not None else "?"
        owner = child._owner if child._owner is not None else child
        self._m.kill_current(cpu, f"exception in a handler of {owner!r} at {where}: "
                                  f"{type(exc).__name__}: {exc}")
        return False

    def _fault_fixup(self, cpu: "CPU", err: unicorn.UcError) -> bool:
        """A guest fault.  During a single-step: put the IP back at the probe address,
        restore the status, and let the fault be handled normally (it oopses)."""
        kcb: KprobeCtlblk = cpu.kprobe_ctlblk
        pc = cpu.pc
        if kcb.status in (Status.HIT_SS, Status.REENTER) and kcb.current is not None:
            site = kcb.current
            cpu.pc = site.addr
            if kcb.status is Status.REENTER:
                self._restore_previous_kprobe(kcb)
            else:
                kcb.reset()
                cpu.preempt_count -= 1
            return False
        base = pc - (pc - mem.SLOTS.start) % self._backend.slot_size
        if pc in mem.SLOTS and base in self._by_slot:
            cpu.pc = self._by_slot[base].addr      # a boosted copy faulted
        return False

    def _oops_reset(self, cpu: "CPU") -> None:
        kcb: KprobeCtlblk = cpu.kprobe_ctlblk
        kcb.reset()
        kcb.prev = None

    def _cpu_in_range(self, start: int, end: int) -> bool:
        for cpu in self._m.cpus:
            kcb = cpu.kprobe_ctlblk
            if kcb.current is not None and kcb.current.slot is not None \
                    and start <= kcb.current.slot < end:
                return True
            if cpu.current is not None and start <= cpu.pc < end:
                return True
        return False

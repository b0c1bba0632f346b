"""The hit path, run inside a Unicorn callback: what arch/x86/kernel/kprobes/core.c does.

  kprobe_int3_handler .. a breakpoint trap: get_kprobe, then reenter_kprobe, or
                         aggr_pre_handler and setup_singlestep; else the end of a step, the
                         kretprobe trampoline, jprobe_return() or a stray trap
  aggr_pre_handler ..... every child's pre_handler, newest first
  setup_singlestep ..... how the probed instruction runs: simulated, out of line in the
                         slot ending in a breakpoint, or boosted (the slot jumps back)
  post_kprobe_handler .. the step's breakpoint: post handlers, then resume after it
  reenter_kprobe ....... a probe hit while another is being handled on this CPU
  kprobe_fault_handler . a handler raised, or the step faulted

Every function returns the trap's one `TrapResult`.  A mixin of `KprobesSubsystem`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import unicorn

from smpkprobes.cpus import StepKind

from ..machine._services import HANDLED, NOT_MINE, Regs, TrapResult
from ._probes import KPROBE_FLAG_DISABLED, KPROBE_FLAG_GONE, Kprobe, _JprobeReturn
from ._state import _HIT_ACTIVE, _NONE, _REENTER, AggrKprobe, KprobeCtlblk, Status

# A child whose handlers do not run: disabled, or GONE (its module text was freed; a new
# probe at the address may have revived the aggregate, see Registry._register).
_OFF = KPROBE_FLAG_DISABLED | KPROBE_FLAG_GONE

if TYPE_CHECKING:    # pragma: no cover
    from ..machine._cpu import CPU

# trapnr passed to fault handlers for a Python exception raised by a handler.
TRAP_HANDLER_EXCEPTION = -1


class HitPath:
    """The hit path of `KprobesSubsystem` (see `_core`)."""

    def kprobe_int3_handler(self, cpu: "CPU", addr: int) -> TrapResult:
        """A breakpoint trap at `addr` on `cpu`."""
        p = self._kprobe_table.get(addr)                 # get_kprobe
        if p is None or not p.children:
            return self._not_a_probe_trap(cpu, addr)
        if p.detour is not None:
            return p.detour             # setup_detour_execution: the stub's hook counts it
        self.traps += 1
        kcb = self.kprobe_ctlblk[cpu.id]
        if kcb.current_kprobe is not None:
            return self.reenter_kprobe(cpu, kcb, p)
        cpu.preempt_count += 1
        kcb.current_kprobe = p                           # set_current_kprobe
        kcb.kprobe_status = _HIT_ACTIVE
        self.hits += 1
        # The trace keeps its events for ever, and much of what a hit costs is the memory
        # they take: name the aggregate's own address object rather than the int made from
        # this trap's PC (the step's event shares it, and the timestamp, see below).
        hit = ("hit", cpu.id, p.addr, cpu.clock + cpu.intra)
        self._trace.append(hit)
        regs = self._Regs(cpu, p.addr)
        redirected = self.aggr_pre_handler(cpu, kcb, p, regs)
        if redirected is not None:
            return redirected
        return self.setup_singlestep(cpu, kcb, p, regs, hit)

    def aggr_pre_handler(self, cpu: "CPU", kcb: KprobeCtlblk, p: AggrKprobe,
                         regs: Regs) -> TrapResult | None:
        """Run the children's pre_handlers.  None: go on to single-step; else a handler
        changed where the CPU goes (or the task died), and the trap is over."""
        for child in p.children:
            if not child._registered:
                self.stale_handlers.append((p.addr, child, "pre_handler"))
            pre_handler = child.pre_handler
            if child.flags & _OFF or pre_handler is None:
                continue
            try:
                ret = pre_handler(child, regs)
            except _JprobeReturn:
                ret = 0
            except BaseException as exc:
                if not self.kprobe_fault_handler(cpu, child, regs, exc):
                    return HANDLED
                continue
            if kcb.current_kprobe is None:
                return HANDLED                # the task died inside the handler
            if ret:
                # No single-step.  A jprobe's setjmp_pre_handler sends the CPU to the
                # jprobe's entry with this probe still current; any other handler changed
                # regs.ip: resume there, the probe done.
                if kcb.jprobe_saved is not None:
                    regs.flush()
                    cpu.pc = regs.read("ip")
                    return HANDLED
                self._finish(cpu, kcb, regs, resume=regs.read("ip"))
                return HANDLED
        return None

    def setup_singlestep(self, cpu: "CPU", kcb: KprobeCtlblk, p: AggrKprobe, regs: Regs,
                         hit: tuple | None = None) -> TrapResult:
        """Execute the probed instruction: simulated now, or stepped out of line in the
        slot.  `hit` is this hit's trace event, when nothing may have been traced since."""
        reenter = kcb.kprobe_status is _REENTER
        if p.boostable and not reenter and not p.post:
            # Boosted: the slot jumps back by itself, and the probe is done as the CPU
            # enters it.  Preemption is enabled again before then; grace periods still wait
            # for the CPU to leave the slot (the slot area is unquiescent text).
            trace = self._trace
            t_ss = cpu.clock + cpu.intra
            if hit is not None and trace and trace[-1] is hit:
                # Nothing traced since the hit: one "boost" event stands for both.
                t = hit[3]
                trace[-1] = ("boost", hit[1], p.addr, t, t if t_ss == t else t_ss)
            else:
                trace.append(("ss", cpu.id, p.addr, t_ss, "boost"))
            p.boost_used = True
            if regs._dirty:
                regs.flush_except_pc()
            kcb.current_kprobe = None
            kcb.kprobe_status = _NONE
            kcb.jprobe_saved = None
            cpu.preempt_count -= 1
            return p.boost_resume
        plan = p.plan
        if plan.kind is StepKind.SIMULATE:
            self._trace.append(("ss", cpu.id, p.addr, cpu.clock + cpu.intra, "simulate"))
            if not reenter:
                kcb.kprobe_status = Status.HIT_SS
            regs.write("ip", p.addr)
            plan.simulate(regs)
            self._run_post_handlers(cpu, kcb, p, regs)
            return HANDLED
        self._trace.append(("ss", cpu.id, p.addr, cpu.clock + cpu.intra, "slot"))
        if not reenter:
            kcb.kprobe_status = Status.HIT_SS
        kcb.ss_addr = p.slot + plan.length
        regs.flush_except_pc()
        return p.step_resume

    def _not_a_probe_trap(self, cpu: "CPU", addr: int) -> TrapResult:
        """A breakpoint trap at no registered probe: the end of a single-step, the kretprobe
        trampoline, jprobe_return(), or a stray trap whose probe is already gone."""
        kcb = self.kprobe_ctlblk[cpu.id]
        if self._slot_lo <= addr < self._slot_hi:
            status = kcb.kprobe_status
            if status is Status.HIT_SS or status is _REENTER:
                p = kcb.current_kprobe
                if addr == kcb.ss_addr:
                    self.post_kprobe_handler(cpu, kcb, p.addr + p.plan.length)
                    return HANDLED
                # A step with several exits (a conditional branch: taken or not).
                resume = p.plan.exit_resume(addr - p.slot) \
                    if p is not None and p.slot is not None else None
                if resume is not None:
                    self.post_kprobe_handler(cpu, kcb, resume)
                    return HANDLED
            return NOT_MINE
        if addr == self._trampoline:
            return self.trampoline_handler(cpu, kcb)
        if addr == self._jprobe_return and kcb.jprobe_saved is not None:
            return self.longjmp_break_handler(cpu, kcb)
        if not self._backend.is_trap_insn(self._kernel.peek(addr, len(self._bp))):
            return self._stray_trap(cpu, addr)
        return NOT_MINE

    def _stray_trap(self, cpu: "CPU", addr: int) -> TrapResult:
        """The probe was removed after this CPU trapped: back up to re-execute the original
        instruction.  The trap serialises this CPU, so drop its stale translation."""
        cpu.flush_tb(addr, addr + len(self._bp))
        cpu.pc = addr
        self.stray_traps += 1
        self._kernel.count_stray_trap()
        self._kernel.trace_event("stray", cpu.id, addr, cpu.clock + cpu.intra)
        return HANDLED

    def post_kprobe_handler(self, cpu: "CPU", kcb: KprobeCtlblk, resume: int) -> None:
        """The out-of-line step trapped at its end: resume after the probed instruction."""
        p = kcb.current_kprobe
        if kcb.kprobe_status is _REENTER:
            # (A normal step's end is its "done": post handlers take no virtual time.)
            self._trace.append(("ssdone", cpu.id, p.addr, cpu.clock + cpu.intra))
            cpu.pc = resume
            kcb.restore_previous_kprobe()
            return
        regs = self._Regs(cpu, resume)
        cpu.pc = resume
        self._run_post_handlers(cpu, kcb, p, regs, resume)

    def _run_post_handlers(self, cpu: "CPU", kcb: KprobeCtlblk, p: AggrKprobe, regs: Regs,
                           pc: int | None = None) -> None:
        if kcb.kprobe_status is _REENTER:
            regs.flush()
            cpu.pc = regs.read("ip")
            kcb.restore_previous_kprobe()
            return
        kcb.kprobe_status = Status.HIT_SSDONE
        for child in p.children:
            if not child._registered:
                self.stale_handlers.append((p.addr, child, "post_handler"))
            if child.flags & _OFF or child.post_handler is None:
                continue
            try:
                child.post_handler(child, regs, 0)
            except BaseException as exc:
                if not self.kprobe_fault_handler(cpu, child, regs, exc):
                    return
        self._finish(cpu, kcb, regs, resume=regs.read("ip"), pc=pc)

    def _finish(self, cpu: "CPU", kcb: KprobeCtlblk, regs: Regs, resume: int,
                pc: int | None = None) -> None:
        """The probe is done on this CPU: resume at `resume`.  `pc` is where the caller has
        put the PC, or will (the end of a step, set before the post_handlers ran, so that
        they and an oops see it; or the address a trap result sends the CPU to): when it is
        `resume`, the CPU is not written here, a call into Unicorn the stepped path would
        otherwise pay twice on every hit."""
        p = kcb.current_kprobe
        self._trace.append(("done", cpu.id, p.addr if p is not None else 0,
                            cpu.clock + cpu.intra))
        if regs._dirty:
            regs.flush_except_pc()
        if resume != pc:
            if p is not None and resume == p.addr and p.armed:
                cpu.note_retrap(resume)     # back onto its own breakpoint: it traps again
            cpu.pc = resume
            if not cpu.executable(resume):
                # A handler sent the CPU where nothing can be fetched: stop here, and the
                # next quantum faults (never start the emulator there, see CPU.run).
                cpu.stop_requested = True
        kcb.reset()
        cpu.preempt_count -= 1

    def reenter_kprobe(self, cpu: "CPU", kcb: KprobeCtlblk, p: AggrKprobe) -> TrapResult:
        """A probe hit while this CPU handles another: count a miss, step it with the
        running probe saved (one level); a hit inside that is unrecoverable."""
        if kcb.kprobe_status is _REENTER:
            msg = (f"Unrecoverable kprobe detected at {self._kernel.format_addr(p.addr)} "
                   f"({', '.join(repr(c) for c in p.children)})")
            self.unrecoverable += 1
            self.simulation_errors.append(msg)
            self._kernel.printk(msg)
            self._kernel.kill_current(cpu, msg)
            return HANDLED
        for child in p.children:
            child.nmissed += 1
        self.missed += 1
        self._kernel.trace_event("miss", cpu.id, p.addr, cpu.clock + cpu.intra)
        kcb.save_previous_kprobe()
        kcb.current_kprobe = p
        kcb.kprobe_status = _REENTER
        return self.setup_singlestep(cpu, kcb, p, self._Regs(cpu, p.addr))

    # -- faults ---------------------------------------------------------------------------
    def kprobe_fault_handler(self, cpu: "CPU", child: Kprobe, regs: Regs,
                             exc: BaseException) -> bool:
        """A handler raised: count a miss, ask the fault_handler, else oops the task.
        Returns True if execution may go on.  KeyboardInterrupt and SystemExit are no
        faults: they go on up, out of the machine."""
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise exc
        child.nmissed += 1
        trapnr = (self._backend.page_fault_trapnr if type(exc).__name__ == "GuestFault"
                  else TRAP_HANDLER_EXCEPTION)
        if child.fault_handler is not None:
            try:
                if child.fault_handler(child, regs, trapnr):
                    return True
            except BaseException as exc2:
                if isinstance(exc2, (KeyboardInterrupt, SystemExit)):
                    raise
                exc = exc2
        where = self._kernel.format_addr(child.addr) if child.addr is not None else "?"
        owner = child._owner if child._owner is not None else child
        self._kernel.kill_current(cpu, f"exception in a handler of {owner!r} at {where}: "
                                       f"{type(exc).__name__}: {exc}")
        return False

    def _step_fault_fixup(self, cpu: "CPU", err: unicorn.UcError) -> bool:
        """A guest fault.  During a single-step: put the IP back at the probe address,
        restore the status, and let the fault be handled normally (it oopses).  A copy run
        out of line with no probe in flight (a boosted slot, an optimized probe's detour
        buffer) faulted: the IP goes back to the original instruction, so that the oops
        names the probed function (Linux would name the insn page)."""
        kcb = self.kprobe_ctlblk[cpu.id]
        pc = cpu.pc
        status = kcb.kprobe_status
        if (status is Status.HIT_SS or status is _REENTER) and kcb.current_kprobe is not None:
            cpu.pc = kcb.current_kprobe.addr
            if status is _REENTER:
                kcb.restore_previous_kprobe()
            else:
                kcb.reset()
                cpu.preempt_count -= 1
            return False
        base = pc - (pc - self._slot_lo) % self._backend.slot_size
        if self._slot_lo <= pc < self._slot_hi and base in self._by_slot:
            cpu.pc = self._by_slot[base].addr      # a boosted copy faulted
        else:
            origin = self.optimizer.copied_insn_origin(pc)
            if origin is not None:
                cpu.pc = origin                    # an optimized probe's copy faulted
        return False

    def _oops_reset(self, event) -> None:
        kcb = self.kprobe_ctlblk[event.cpu.id]
        kcb.reset()
        kcb.prev_kprobe = None

    def _cpu_in_range(self, start: int, end: int) -> bool:
        for cpu in self._kernel.cpus:
            p = self.kprobe_ctlblk[cpu.id].current_kprobe
            if p is not None and p.slot is not None and start <= p.slot < end:
                return True
            if cpu.current is not None and start <= cpu.pc < end:
                return True
        return False

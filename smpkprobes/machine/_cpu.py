"""One simulated CPU: a Unicorn instance over the shared memory.

The CPU knows how to run a quantum, how to read and write its registers quickly, and how to
turn Unicorn's callbacks into events for its host (the machine): a hypercall stub was
reached, a breakpoint trap was taken (handed to the CPU's trap sink), another trap was taken,
emulation faulted.  It does not know about probes.

Exceptions never escape a Unicorn callback: every hook catches everything, stops the CPU and
hands the exception to the host, which turns it into an oops of the current task.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Protocol

import unicorn
from unicorn.unicorn_py3.unicorn import HOOK_CODE_CFUNC as _CODE_CB
from unicorn.unicorn_py3.unicorn import HOOK_INTR_CFUNC as _INTR_CB
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

from smpkprobes.cpus import CpuBackend

from ._blockbudget import BlockBudget
from ._codehook import code_hook
from ._regs import Regs, regs_class



def _bare_function(name: str):
    """The binding's library function `name` without the argtypes the binding declares:
    a call then converts nothing (the caller passes the handle as the binding's c_void_p, a
    register id as a Python int, values by reference), which halves its cost - 150 ns
    against 320 on this host, and a probe hit makes two."""
    fn = getattr(ctypes.CDLL(uclib._name), name)
    fn.argtypes = None
    fn.restype = ctypes.c_int
    return fn


_uc_reg_read = _bare_function("uc_reg_read")
_uc_reg_write = _bare_function("uc_reg_write")
_uc_emu_start = uclib.uc_emu_start
_uc_emu_stop = uclib.uc_emu_stop


class GuestFault(Exception):
    """A guest call made from a handler (`regs.cpu.call`) faulted."""


class CpuHost(Protocol):
    """What a CPU asks of the machine: the only back-channel it has."""

    task_return_addr: int          # where every task's outermost frame returns to

    def on_hypercall(self, cpu: "CPU", addr: int) -> None: ...
    def on_foreign_trap(self, cpu: "CPU", intno: int) -> None: ...
    def on_unowned_trap(self, cpu: "CPU", addr: int) -> None: ...
    def on_hook_exception(self, cpu: "CPU", exc: BaseException) -> None: ...
    def resolve_return_address(self, cpu: "CPU", addr: int, depth: int) -> tuple[int, int]: ...
    def resolve_function(self, func) -> int: ...
    def format_addr(self, addr: int) -> str: ...
    def symbolize(self, addr: int): ...


class CPU:
    """Public surface for handlers: `.id`, `.now_ns()`, `.preemptible()`, `.call()`."""

    def __init__(self, cpu_id: int, backend: CpuBackend, memory, host: CpuHost,
                 hypercall_range: tuple[int, int], call_return: int, call_budget: int,
                 insn_starts):
        self.id = cpu_id
        self.backend = backend
        self._memory = memory
        self._host = host
        self._quirks = quirks = backend.unicorn
        self.uc = unicorn.Uc(quirks.uc_arch, quirks.uc_mode)
        self._uch = self.uc._uch
        quirks.setup(self.uc)
        memory.map_into(self.uc)
        self._ids = dict(backend.registers)
        # regs.ip / regs.sp / regs.flags, resolved once per CPU rather than once per trap.
        self.reg_aliases = {"ip": backend.cc.pc_reg, "sp": backend.cc.sp_reg,
                            "flags": backend.flags_reg}
        self._pc_id = self._ids[backend.cc.pc_reg]
        self._val = ctypes.c_uint64()
        self._val_ref = ctypes.byref(self._val)
        self._wval = ctypes.c_uint64()
        self._wval_ref = ctypes.byref(self._wval)
        self._word = struct.Struct(("<" if backend.endian == "little" else ">") +
                                   ("Q" if backend.bits == 64 else "I"))
        # read_word(addr) / write_word(addr, value): one checked machine word (stack slots,
        # return addresses); a GuestMemoryError where nothing is mapped.
        self.read_word, self.write_word = memory.word_access(self._word, backend.word_mask)
        self._call_return = call_return
        self._call_budget = call_budget
        self._until = quirks.emu_until          # never reached: see UnicornQuirks.emu_until
        # Scheduling state, owned by the machine.
        self.current = None            # the running Task, or None when idle
        self.clock = 0                 # virtual ns: one per instruction
        self.intra = 0                 # ns elapsed inside the current quantum (per trap)
        self.instructions = 0
        self.tasks_run = 0
        self.quanta = 0
        self.preempt_count = 0         # > 0 from a probe trap until its post-processing ends
        self.pending_flush: list[list] = []    # [[start, end, quanta_until_delivery], ...]
        self.deferred_trap = False
        self.stop_requested = False
        self.online = True
        self.nesting = 0
        self.deferred_addr = 0
        # Traps resumed at the very breakpoint that trapped (retried with no instruction
        # run), this quantum, and where the latest was; the scheduler turns a run of
        # quanta made of nothing else into a soft-lockup oops (_sched).
        self.retraps = 0
        self.retrap_addr = 0
        self.stalled_quanta = 0
        # Breakpoint traps: trap_sink(cpu, addr) -> TrapResult, set by the host (see _traps).
        self.trap_sink = None
        self.traps = 0
        self.trap_cost = 0             # virtual ns a trap costs inside a quantum (the host's)
        self._trap_intno = quirks.trap_intno
        self._trap_pc_offset = quirks.trap_pc_offset
        # The trap path's own PC word: only ever a PC, so a 32-bit arch's reads (which fill
        # its low half) leave the high half 0 as it started, and it needs no clearing
        # before each read, as the shared `_val` does (one c_uint64 set less per trap).
        self._trap_pc = ctypes.c_uint64()
        self._trap_pc_ref = ctypes.byref(self._trap_pc)
        # Hooks are registered with raw ctypes callbacks: the binding's own wrappers cost
        # about a third of a bare callback, and ours already catch every exception.
        self._hooks = []
        self._raw_hook(unicorn.UC_HOOK_INTR, _INTR_CB(self._hook_intr), 1, 0)
        self._raw_hook(unicorn.UC_HOOK_CODE, _CODE_CB(self._hook_hypercall),
                       hypercall_range[0], hypercall_range[1] - 1)
        # Quanta end at block starts once their instruction budget is spent (_blockbudget).
        self._budget = BlockBudget(insn_starts)
        self._budget_ctx = self._budget.ctx
        self._unspent = 0
        self._nested = 0               # instructions nested calls ran inside the latest run()
        self.charged = 0               # instructions the latest run() ran, nested calls included
        self.executed = 0              # instructions this CPU ran, all told
        self._budget.install(self._uch, lambda htype, fptr, user: self._raw_hook(
            htype, fptr, 1, 0, user))
        self.initial_context = self.context_save()
        # Where this CPU may fetch instructions; a quantum never starts elsewhere.  (A jump
        # to unmapped memory is a fetch fault on every arch that way: a fetch there faults,
        # or, at address 0 on most arches, Unicorn stops as at the `until` address and the
        # next quantum finds the PC unmapped.  sparc64's `until` is never a PC.)
        self._exec_ranges = tuple((b, e + 1) for b, e, perms in self.uc.mem_regions()
                                  if perms & unicorn.UC_PROT_EXEC)
        # A KeyboardInterrupt or SystemExit raised in a callback, re-raised once Unicorn
        # has returned (an exception cannot cross the C frames of a callback).
        self.pending_exception: BaseException | None = None

    def executable(self, addr: int) -> bool:
        for lo, hi in self._exec_ranges:
            if lo <= addr < hi:
                return True
        return False

    def _raw_hook(self, htype: int, fptr, begin: int, end: int, user=None) -> None:
        handle = uc_hook_h()
        err = uclib.uc_hook_add(self._uch, ctypes.byref(handle), htype, fptr,
                                user if user is not None else ctypes.c_void_p(0),
                                ctypes.c_uint64(begin), ctypes.c_uint64(end))
        if err != unicorn.UC_ERR_OK:
            raise unicorn.UcError(err)
        self._hooks.append(fptr)      # keep the callback alive as long as the CPU

    def add_code_hook(self, begin: int, end: int, callback) -> None:
        """Call `callback(addr)` before every instruction in [begin, end): a bare code hook
        (an optimized probe's detour entry), dispatched as _codehook says.  The callback is
        bound to this CPU beforehand, and returns `cpu.stop_requested` (true: a nested
        call asked to end the quantum, which ends now).  Exceptions go where the machine's
        own hooks send them."""
        fptr, ctx = code_hook(callback, self._code_hook_error, self._stop_now)
        self._raw_hook(unicorn.UC_HOOK_CODE, fptr, begin, end - 1,
                       None if ctx is None else ctypes.c_void_p(ctypes.addressof(ctx)))
        self._hooks.append(ctx)
        self.flush_tb(begin, end)       # code translated before the hook would skip it

    def note_retrap(self, addr: int) -> None:
        """A trap at `addr` is resumed at `addr` itself: it will trap again before any
        instruction runs (the soft-lockup watchdog counts these, see _sched)."""
        self.retraps += 1
        self.retrap_addr = addr

    def _code_hook_error(self, exc: BaseException) -> bool:
        self._host.on_hook_exception(self, exc)
        return self.stop_requested

    # -- registers and memory, fast ---------------------------------------------------
    def reg_read_id(self, rid: int) -> int:
        self._val.value = 0
        _uc_reg_read(self._uch, rid, self._val_ref)
        return self._val.value

    def reg_write_id(self, rid: int, value: int) -> None:
        self._wval.value = value
        _uc_reg_write(self._uch, rid, self._wval_ref)

    def reg_read(self, name: str) -> int:
        rid = self._ids[name]
        if rid < 0:
            return self._quirks.read_special(self.uc, rid)
        val = self._val                 # reg_read_id, inlined: a call less per read
        val.value = 0
        _uc_reg_read(self._uch, rid, self._val_ref)
        return val.value

    def reg_write(self, name: str, value: int) -> None:
        rid = self._ids[name]
        if rid < 0:
            self._quirks.write_special(self.uc, rid, value & self.backend.word_mask)
        else:
            self.reg_write_id(rid, value & self.backend.word_mask)

    # The PC is read and written on every trap: one call into Unicorn each, no more.
    @property
    def pc(self) -> int:
        val = self._val
        val.value = 0
        _uc_reg_read(self._uch, self._pc_id, self._val_ref)
        return val.value

    @pc.setter
    def pc(self, value: int) -> None:
        self._wval.value = value
        _uc_reg_write(self._uch, self._pc_id, self._wval_ref)

    # RegAccess over the live CPU (no caching), for the machine's own use.
    read = reg_read
    write = reg_write

    def regs(self) -> Regs:
        return regs_class(self.backend)(self)

    # -- running ------------------------------------------------------------------------
    def context_save(self):
        """The CPU state a task switch keeps (the backend's: Unicorn's context on most
        arches)."""
        return self._quirks.context_save(self.uc)

    def context_restore(self, ctx) -> None:
        self._quirks.context_restore(self.uc, ctx)

    def flush_tb(self, start: int, end: int) -> None:
        """Drop translated code for [start, end): the analogue of sync_core after an IPI."""
        self.uc.ctl_remove_cache(start, end)

    def run(self, count: int) -> unicorn.UcError | None:
        """Run `count` instructions from the current PC, rounded up to a whole block, or
        fewer if something stops the CPU first.  Returns the Unicorn error if emulation
        faulted, else None.  `charged` is then what ran, and `executed` has grown by it."""
        self.stop_requested = False
        self._raise_pending()
        pc = self.reg_read_id(self._pc_id)
        for lo, hi in self._exec_ranges:
            if lo <= pc < hi:
                break
        else:
            self.charged = 0
            return unicorn.UcError(unicorn.UC_ERR_FETCH_UNMAPPED)
        begin = self._quirks.emu_start_address(self.uc, pc)
        self._budget_ctx.budget = count
        self._unspent = 0
        self._nested = 0
        err = _uc_emu_start(self._uch, begin, self._until, 0, 0)
        # What the blocks that started took off the budget (the last one is counted whole),
        # and what calls made from its handlers ran (already in `executed`).
        ran = count - self._unspent - self._budget_ctx.budget
        self.executed += ran
        self.charged = ran + self._nested
        self._raise_pending()
        if err != unicorn.UC_ERR_OK:
            return unicorn.UcError(err)
        if not ran and not self.stop_requested:
            # Nothing ran and nothing stopped it: Unicorn returns at once when the start is
            # the (unused) `until` address, 0, where a real CPU takes a fetch fault (nothing
            # is mapped there).  Say so, or the task would stay there for ever.
            return unicorn.UcError(unicorn.UC_ERR_FETCH_UNMAPPED)
        return None

    def _raise_pending(self) -> None:
        exc = self.pending_exception
        if exc is not None:
            self.pending_exception = None
            raise exc

    def _stop_now(self) -> None:
        # Unicorn drops a stop requested in the same callback that moved the PC (it
        # restarts at the new PC instead); a spent budget stops at the next block regardless.
        ctx = self._budget_ctx
        if ctx.budget > 0:
            self._unspent += ctx.budget
            ctx.budget = 0
        _uc_emu_stop(self._uch)

    # -- what handlers may use ------------------------------------------------------------
    def now_ns(self) -> int:
        """Deterministic virtual time: one ns per instruction (counted at quantum
        boundaries), plus a fixed cost per trap or hypercall inside the quantum."""
        return self.clock + self.intra

    def preemptible(self) -> bool:
        return self.preempt_count == 0 and not self.deferred_trap

    def call(self, func, *args: int) -> int:
        """Call a guest function synchronously on this CPU, from inside a handler, as kernel
        code would.  Probes hit inside it count as missed (reentry)."""
        addr = self._host.resolve_function(func)
        saved = self.context_save()
        cc = self.backend.cc
        sp = self.reg_read(cc.sp_reg) - 256
        cc.setup_call(self, sp, addr, tuple(args), self._call_return)
        self.nesting += 1
        self.stop_requested = False
        # The nested run has a budget of its own; the outer one's is put back after it.
        ctx = self._budget_ctx
        outer_budget, outer_unspent = ctx.budget, self._unspent
        ctx.budget, self._unspent = self._call_budget, 0
        try:
            # No `until`: the __hc_call_return hook stops the CPU before the stub runs (and
            # Unicorn 2.1.4's sparc64 loops on the instruction before an `until` address).
            err = _uc_emu_start(self._uch, addr, self._until, 0, 0) if self.executable(addr) \
                else unicorn.UC_ERR_FETCH_UNMAPPED
            self._raise_pending()
            pc = self.reg_read_id(self._pc_id)
            if err != unicorn.UC_ERR_OK:
                raise GuestFault(f"guest fault in nested call of {self._host.format_addr(addr)}"
                                 f" at {self._host.format_addr(pc)}: {unicorn.UcError(err)}")
            if pc != self._call_return:
                raise GuestFault(f"nested call of {self._host.format_addr(addr)} did not return"
                                 f" within {self._call_budget} instructions")
            result = self.backend.sign_extend(self.reg_read(cc.ret_reg))
        finally:
            ran = self._call_budget - self._unspent - ctx.budget
            self.executed += ran
            self._nested += ran
            ctx.budget, self._unspent = outer_budget, outer_unspent
            self.nesting -= 1
            self.context_restore(saved)
            # End the outer quantum when the current callback returns (the nested call
            # took its time).
            self.stop_requested = True
        return result

    def stack_trace(self, regs: Regs) -> list[int]:
        b = self.backend
        ip = regs.read("ip")
        trace = [ip]
        depth = 0
        resolve = self._host.resolve_return_address
        sym = self._host.symbolize(ip)
        # The stubs a task's outermost frame or a nested call returns to are reached by a
        # return, never called: no caller, so nothing to read where a return address would
        # be (a link register still holds the address just returned through, possibly the
        # kretprobe trampoline with no instance left to resolve it).
        outermost = ip == self._call_return or ip == self._host.task_return_addr
        if sym is not None and not outermost \
                and b.frame_pending(self._memory.peek(ip - sym[1], sym[1])):
            # At a function's first instruction (or anywhere in a leaf, on some ABIs) the
            # frame is not built yet: the return address is where the calling convention
            # put it.
            ra = b.cc.get_return_address(regs)
            ra, depth = resolve(self, ra, depth)
            if ra and self._host.symbolize(ra) is not None:
                trace.append(ra)
        fp = b.frame_start(self, regs)
        task = self.current
        lo, hi = (task.stack_base, task.stack_top) if task is not None else (0, 0)
        for _ in range(64):
            if not lo <= fp < hi:
                break
            ra, nfp = b.unwind_frame(self.read_word, fp)
            if ra == 0 or self._host.symbolize(ra) is None:
                break
            ra, depth = resolve(self, ra, depth)
            trace.append(ra)
            if nfp <= fp:
                break
            fp = nfp
        return trace

    # -- Unicorn callbacks ---------------------------------------------------------------
    def _hook_intr(self, _uc, intno, _user):
        try:
            # The probe hit path: the PC read, the trap sink's call and the PC write it may
            # ask for (resume_at) are all made here.
            pc = self._trap_pc
            _uc_reg_read(self._uch, self._pc_id, self._trap_pc_ref)
            if intno == self._trap_intno:
                self.traps += 1
                self.intra += self.trap_cost
                addr = pc.value - self._trap_pc_offset
                # (Read, then called: `self.trap_sink(...)` would be a method lookup, which
                # CPython does not specialize for an instance attribute.)
                sink = self.trap_sink
                result = sink(self, addr)
                resume = result.resume
                if resume is not None:
                    if resume == addr:          # retried: see retraps
                        self.note_retrap(addr)
                    pc.value = resume
                    _uc_reg_write(self._uch, self._pc_id, self._trap_pc_ref)
                elif not result.owned and self.current is not None:
                    self._host.on_unowned_trap(self, addr)
            else:
                self._host.on_foreign_trap(self, intno)
        except BaseException as exc:       # never lose an exception inside Unicorn
            self._host.on_hook_exception(self, exc)
        if self.stop_requested:
            self._stop_now()

    def _hook_hypercall(self, _uc, addr, size, _user):
        try:
            self._host.on_hypercall(self, addr)
        except BaseException as exc:
            self._host.on_hook_exception(self, exc)
        if self.stop_requested:
            self._stop_now()

    def __repr__(self) -> str:
        return f"<cpu{self.id}>"

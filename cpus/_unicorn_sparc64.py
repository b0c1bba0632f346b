"""sparc64 on Unicorn 2.1.4: what the emulator gives a sparc64 guest, measured, and what the
backend does about it.

* `uc_context_save` saves nothing (its size is the bare 40-byte header) and the register
  API knows only %g, %o, %l, %i of the *current* window and %pc: no nPC, CCR, Y, CWP or
  window counters.  So the backend reaches Unicorn's CPUSPARCState directly: it finds it
  once per CPU (`_CpuState`, a scan for known register values, cross-checked) and saves
  and restores tasks' contexts itself, register windows and condition codes included.
* `ta n` raises interrupt 0x100 + (n & 0x7f).  In the hook Unicorn has set PC *and* nPC
  to the trap's nPC (the next instruction; nPC is not advanced), so `trap_pc_offset`
  is 4 and the hook must always write PC (which sets nPC = PC + 4).
* SAVE/RESTORE do not handle window overflow: with CANSAVE = 0 a SAVE raises a spill
  trap (0x80+), with CANRESTORE = 0 a RESTORE a fill trap (0xc0+), and Unicorn does not
  vector them to TBA (it only calls the interrupt hook).  The backend is the firmware:
  `handle_firmware_trap` spills or fills one window to or from its save area at
  %sp + 2047 and retries the instruction.  Unicorn reports these traps with PC = nPC of
  the faulting instruction, so only a SAVE/RESTORE *outside* a delay slot can be found
  and retried (in a delay slot PC is lost: after `ret; restore` it reads 1).  The
  kernel is therefore built with clang's delay-slot filler off (build.py): every delay
  slot holds a nop, and functions end `restore; retl; nop`.  clang has no -mflat.
* A stop can fall between a branch and its delay slot (PC = the slot, nPC = the target;
  with quanta counted in blocks, when the delay slot starts a new page), and
  `emu_start` resets nPC = begin + 4.  `emu_start_address`
  resumes such a CPU at nPC when the delay slot is a nop, or through a two-instruction
  trampoline (`ba nPC` + a copy of the delay instruction) on a private page otherwise.
* `emu_start(..., until)` re-executes the instruction before `until` for ever; the
  machine's nested calls end through the __hc_call_return hook instead.  The same spin
  follows a guest jump *to* `until`: with `until` = 0, a call through a NULL function
  pointer (`jmpl %o0` with %o0 = 0) never returns from `emu_start`, no hook runs and only
  SIGKILL ends it, where a jump to 4 or to any other unmapped address is a clean
  UC_ERR_FETCH_UNMAPPED.  So sparc64's `until` is all ones (`emu_until`): an odd address,
  which no jump reaches (a misaligned target traps first, mem_address_not_aligned), so a
  jump to 0 is the fetch fault it is on every other arch.
* `emu_start(..., count)` is implemented with a code hook on every instruction, and a
  code hook on the delay slot of a `jmpl` (every `retl`) replaces the computed nPC with
  QEMU's "dynamic" marker 1: the CPU jumps to address 1.  The machine never uses it:
  quanta are counted in whole translation blocks on every arch (smpkprobes/_blockbudget),
  and block hooks leave nPC intact.
"""

from __future__ import annotations

import ctypes
import re
import struct

import unicorn
import unicorn.sparc_const as us

from ._sparc64_insn import _MASK, BIAS, NOP, _ba, _op, _op3
from ._unicorn import UnicornQuirks

TRAP_INTNO = 0x100 + 0x70      # Unicorn: TT_TRAP + (immediate & 0x7f) for `ta 0x70`
# Served from Unicorn's CPU state (its register API has neither): the condition codes
# (xcc << 4 | icc, V9's %ccr) and %y.
_CCR, _Y = -1, -2


# == condition codes ========================================================================
# QEMU evaluates the condition codes lazily: the last flag-setting operation's kind (cc_op)
# and operands (cc_src, cc_src2, cc_dst) stand for them until something needs the bits.
(_CC_FLAGS, _CC_DIV, _CC_ADD, _CC_ADDX, _CC_TADD, _CC_TADDTV, _CC_SUB, _CC_SUBX, _CC_TSUB,
 _CC_TSUBTV, _CC_LOGIC) = range(1, 12)
_ADDS = (_CC_ADD, _CC_ADDX, _CC_TADD, _CC_TADDTV)
_SUBS = (_CC_SUB, _CC_SUBX, _CC_TSUB, _CC_TSUBTV)


def _nzvc(op: int, src1: int, src2: int, dst: int, bits: int) -> int:
    """N, Z, V, C (bits 3..0) of a `bits`-wide result of a cc_op operation (SPARC V9
    semantics of addcc, addxcc, subcc, subxcc, the tagged forms, logical ops, divcc)."""
    m, top = (1 << bits) - 1, bits - 1
    src1, src2, dst = src1 & m, src2 & m, dst & m
    nz = (dst >> top) << 3 | (dst == 0) << 2
    if op in _ADDS:
        v = ((src1 ^ src2 ^ m) & (src1 ^ dst)) >> top
        if op == _CC_ADDX:
            c = ((src1 & src2) | (~dst & (src1 | src2))) >> top & 1
        else:
            c = int(dst < src1)
    elif op in _SUBS:
        v = ((src1 ^ src2) & (src1 ^ dst)) >> top
        if op == _CC_SUBX:
            c = ((~src1 & src2) | (dst & (~src1 | src2))) >> top & 1
        else:
            c = int(src1 < src2)
    else:                               # logic; divcc: V is the overflow QEMU keeps in src2
        v = int(op == _CC_DIV and bits == 32 and src2 != 0)
        c = 0
    if bits == 32 and op in (_CC_TADD, _CC_TSUB) and (src1 | src2) & 3:
        v = 1                           # tag overflow
    if bits == 32 and op in (_CC_TADDTV, _CC_TSUBTV):
        v = 0                           # (it would have trapped instead)
    return nz | v << 1 | c


# == Unicorn's CPU state, reached directly ================================================
# Offsets in CPUSPARCState of Unicorn 2.1.4 (QEMU 5.0.x, TARGET_SPARC64, 64-bit host).
_OFF_PC, _OFF_NPC, _OFF_REGWPTR = 72, 80, 64
_OFF_Y, _OFF_CC_SRC, _OFF_CC_SRC2, _OFF_CC_DST, _OFF_CC_OP, _OFF_PSR = 88, 96, 104, 112, 120, 136
_OFF_XCC = 7232
_OFF_CWP = 408
_OFF_REGBASE = 440
_RESET_END = 4600              # end_reset_fields: registers, windows, CCs, Y, FPU
_OFF_NWINDOWS = 4608
_OFF_WINSTATE = 7232           # xcc, asi, pstate, tl, maxtl, cansave .. cleanwin
_WINSTATE_LEN = 40
_OFF_TL, _OFF_MAXTL = 7244, 7248
_OFF_CANSAVE, _OFF_CANRESTORE, _OFF_OTHERWIN, _OFF_CLEANWIN = 7252, 7256, 7260, 7268

_U32 = ctypes.c_uint32
_U64 = ctypes.c_uint64


class LayoutError(RuntimeError):
    """Unicorn's CPU state is not laid out as this backend expects."""


class _CpuState:
    """One Unicorn instance's CPUSPARCState, reached by address.

    Found by writing recognisable values into %g1-%g7 and %pc through the register API
    and scanning this process's writable memory for them; a hit must also have nPC = PC
    + 4 and a register-window pointer into its own register file.  The window counters
    are then checked against values only a sparc64 CPU state has (8 windows, TL 0)."""

    def __init__(self, uc):
        self.base = self._locate(uc)
        self.nwindows = _U32.from_address(self.base + _OFF_NWINDOWS).value
        maxtl = _U32.from_address(self.base + _OFF_MAXTL).value
        tl = _U32.from_address(self.base + _OFF_TL).value
        if self.nwindows != 8 or not 1 <= maxtl <= 8 or tl != 0:
            raise LayoutError(f"unexpected sparc64 CPU state (NWINDOWS {self.nwindows}, "
                              f"MAXTL {maxtl}, TL {tl}): this backend knows Unicorn 2.1.4's")
        self._regbase = self.base + _OFF_REGBASE
        self._pc = _U64.from_address(self.base + _OFF_PC)
        self._npc = _U64.from_address(self.base + _OFF_NPC)
        self._cwp = _U32.from_address(self.base + _OFF_CWP)
        self._cansave = _U32.from_address(self.base + _OFF_CANSAVE)
        self._canrestore = _U32.from_address(self.base + _OFF_CANRESTORE)
        # A clean reset of the window state (Unicorn leaves CANSAVE at 0, so the very first
        # SAVE would spill).  CLEANWIN = NWINDOWS - 1 means no clean_window traps.
        self.set_cwp(0)
        self._cansave.value = self.nwindows - 2
        self._canrestore.value = 0
        _U32.from_address(self.base + _OFF_OTHERWIN).value = 0
        _U32.from_address(self.base + _OFF_CLEANWIN).value = self.nwindows - 1

    @staticmethod
    def _locate(uc) -> int:
        marks = [0x5EC0_0000_0000_0000 | (i << 40) | 0x5A5A_0000 | i for i in range(1, 8)]
        pc = 0x5EC0_0000_1234_0000
        for i, v in enumerate(marks):
            uc.reg_write(us.UC_SPARC_REG_G1 + i, v)
        uc.reg_write(us.UC_SPARC_REG_PC, pc)
        pattern = re.compile(re.escape(struct.pack("=8Q", 0, *marks)))
        hits = []
        with open("/proc/self/maps") as maps:
            regions = [line.split() for line in maps]
        # The CPU state is heap memory: scan [heap] first, then the other private writable
        # mappings of a plausible size.  Memory is read through /proc/self/mem, where a
        # mapping that went away since /proc/self/maps was read is an error, not a SIGSEGV.
        regions.sort(key=lambda parts: parts[-1] != "[heap]")
        with open("/proc/self/mem", "rb", buffering=0) as mem:
            for parts in regions:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if parts[1] != "rw-p" or (hi - lo > 64 << 20 and parts[-1] != "[heap]"):
                    continue
                try:
                    mem.seek(lo)
                    buf = mem.read(hi - lo)
                except (OSError, ValueError, OverflowError):
                    continue
                for m in pattern.finditer(buf):
                    at = m.start()
                    if at + _OFF_WINSTATE + _WINSTATE_LEN > len(buf):
                        continue
                    regwptr, spc, snpc = struct.unpack_from("=3Q", buf, at + _OFF_REGWPTR)
                    cwp = struct.unpack_from("=I", buf, at + _OFF_CWP)[0]
                    if spc == pc and snpc == pc + 4 and cwp < 32 \
                            and regwptr == lo + at + _OFF_REGBASE + cwp * 128:
                        hits.append(lo + at)
                if hits:
                    break
        for i in range(7):
            uc.reg_write(us.UC_SPARC_REG_G1 + i, 0)
        uc.reg_write(us.UC_SPARC_REG_PC, 0)
        if len(hits) != 1:
            raise LayoutError(f"cannot find Unicorn's sparc64 CPU state ({len(hits)} candidates)")
        return hits[0]

    # -- plain fields ------------------------------------------------------------------
    @property
    def pc(self) -> int:
        return self._pc.value

    @property
    def npc(self) -> int:
        return self._npc.value

    @property
    def cwp(self) -> int:
        return self._cwp.value

    def set_cwp(self, cwp: int) -> None:
        self._cwp.value = cwp
        _U64.from_address(self.base + _OFF_REGWPTR).value = self._regbase + cwp * 128

    def ccr(self) -> int:
        b = self.base
        op = _U32.from_address(b + _OFF_CC_OP).value
        if op in (0, _CC_FLAGS):
            icc = _U32.from_address(b + _OFF_PSR).value >> 20 & 0xF
            xcc = _U32.from_address(b + _OFF_XCC).value >> 20 & 0xF
            return xcc << 4 | icc
        src1, src2, dst = (_U64.from_address(b + off).value
                           for off in (_OFF_CC_SRC, _OFF_CC_SRC2, _OFF_CC_DST))
        return _nzvc(op, src1, src2, dst, 64) << 4 | _nzvc(op, src1, src2, dst, 32)

    def set_ccr(self, value: int) -> None:
        b = self.base
        psr = _U32.from_address(b + _OFF_PSR)
        psr.value = (psr.value & ~0xF00000) | (value & 0xF) << 20
        _U32.from_address(b + _OFF_XCC).value = (value >> 4 & 0xF) << 20
        _U32.from_address(b + _OFF_CC_OP).value = _CC_FLAGS

    # -- register windows --------------------------------------------------------------
    def _slot(self, window: int, reg: int) -> _U64:
        """Register `reg` (0-7 outs, 8-15 locals, 16-23 ins) of QEMU window `window`.  SAVE
        decrements QEMU's window number; a window's ins are the next one's outs.  The ins
        of the last window wrap to window 0's outs, which QEMU keeps in 8 spare words while
        the last window is current."""
        nw16 = self.nwindows * 16
        idx = window * 16 + reg
        last = self.cwp == self.nwindows - 1
        if idx >= nw16 and not last:
            idx -= nw16
        elif idx < 8 and last:
            idx += nw16
        return _U64.from_address(self._regbase + idx * 8)

    def spill(self, write_word) -> None:
        """Store the oldest restorable window in its save area and free it (what a V9
        spill handler followed by SAVED does)."""
        canrestore = self._canrestore.value
        w = (self.cwp + canrestore) % self.nwindows
        area = self._slot(w, 6).value + BIAS
        for k in range(16):
            write_word(area + 8 * k, self._slot(w, 8 + k).value)
        self._cansave.value += 1
        self._canrestore.value = canrestore - 1

    def fill(self, read_word) -> None:
        """Load the caller's window from its save area at the current %fp (a fill handler
        followed by RESTORED)."""
        w = (self.cwp + 1) % self.nwindows
        area = self._slot(self.cwp, 22).value + BIAS
        for k in range(16):
            self._slot(w, 8 + k).value = read_word(area + 8 * k) & _MASK
        self._cansave.value -= 1
        self._canrestore.value += 1

    def flush(self, write_word) -> None:
        """flushw, and the current window too: every frame's %l/%i registers in its save
        area, so a stack walk can read them from memory."""
        while self._canrestore.value:
            self.spill(write_word)
        area = self._slot(self.cwp, 6).value + BIAS
        for k in range(16):
            write_word(area + 8 * k, self._slot(self.cwp, 8 + k).value)

    # -- whole-CPU context -------------------------------------------------------------
    def save(self) -> tuple[bytes, bytes]:
        return (ctypes.string_at(self.base, _RESET_END),
                ctypes.string_at(self.base + _OFF_WINSTATE, _WINSTATE_LEN))

    def restore(self, ctx: tuple[bytes, bytes]) -> None:
        regs, winstate = ctx
        ctypes.memmove(self.base, regs, _RESET_END)
        ctypes.memmove(self.base + _OFF_WINSTATE, winstate, _WINSTATE_LEN)
        # The context may come from another CPU: point the window at our own registers.
        self.set_cwp(self._cwp.value)



_TRAMPOLINE = 0x7FE000         # private per-CPU page (8 KiB, the sparc64 page size), within
                               # `ba` reach of all text and slots
_FIRMWARE_TRAPS = (0x24,)      # clean_window; spill 0x80-0xbf and fill 0xc0-0xff below


class Sparc64Quirks(UnicornQuirks):
    """Unicorn's sparc64: a CPU state reached directly (`_CpuState`), the register windows'
    firmware, and resuming a CPU stopped in a delay slot."""

    # -- Unicorn setup and the CPU state -----------------------------------------------------
    def setup(self, uc) -> None:
        uc._sparc64_state = _CpuState(uc)
        uc.mem_map(_TRAMPOLINE, 0x2000, unicorn.UC_PROT_READ | unicorn.UC_PROT_EXEC)

    @staticmethod
    def _state(uc) -> _CpuState:
        return uc._sparc64_state

    def context_save(self, uc):
        """Unicorn's context saves nothing on sparc64: the backend keeps its own."""
        return self._state(uc).save()

    def context_restore(self, uc, ctx) -> None:
        self._state(uc).restore(ctx)

    def read_special(self, uc, rid: int) -> int:
        state = self._state(uc)
        if rid == _CCR:
            return state.ccr()
        if rid == _Y:
            return _U64.from_address(state.base + _OFF_Y).value
        raise KeyError(rid)

    def write_special(self, uc, rid: int, value: int) -> None:
        state = self._state(uc)
        if rid == _CCR:
            state.set_ccr(value)
        elif rid == _Y:
            _U64.from_address(state.base + _OFF_Y).value = value & 0xFFFFFFFF
        else:
            raise KeyError(rid)

    def emu_start_address(self, uc, pc: int) -> int:
        """Resume at `pc` with the saved nPC.  Only a CPU stopped in a delay slot has
        nPC != PC + 4: a nop there is skipped; anything else runs from the trampoline
        `ba nPC; <copy of the delay instruction>`."""
        npc = self._state(uc).npc
        if npc == pc + 4:
            return pc
        insn = int.from_bytes(uc.mem_read(pc, 4), "big")
        if insn == NOP:
            return npc
        uc.mem_write(_TRAMPOLINE, struct.pack(">II", _ba(_TRAMPOLINE, npc), insn))
        uc.ctl_remove_cache(_TRAMPOLINE, _TRAMPOLINE + 8)
        return _TRAMPOLINE

    def handle_firmware_trap(self, cpu, intno: int) -> bool:
        """Register-window spill and fill traps: the firmware's job.  The trapping SAVE,
        RESTORE or FLUSHW is the instruction before Unicorn's reported PC (see the module
        docstring); spill or fill one window and retry it."""
        if not (0x80 <= intno < 0x100 or intno in _FIRMWARE_TRAPS):
            return False
        uc = cpu.uc
        state = self._state(uc)
        at = state.pc - 4
        try:
            insn = int.from_bytes(uc.mem_read(at, 4), "big")
        except unicorn.UcError:
            return False
        op3 = _op3(insn) if _op(insn) == 2 else -1
        if 0x80 <= intno < 0xC0 and op3 in (0x3C, 0x2B):               # SAVE, FLUSHW
            state.spill(cpu.write_word)
        elif intno >= 0xC0 and op3 in (0x3D, 0x39):                     # RESTORE, RETURN
            state.fill(cpu.read_word)
        elif intno == 0x24 and op3 == 0x3C:                             # clean_window
            _U32.from_address(state.base + _OFF_CLEANWIN).value = state.nwindows - 1
        else:
            return False
        cpu.pc = at
        return True

    def flush_windows(self, cpu) -> None:
        """flushw, and the current window too: every frame's %l/%i registers in its save
        area in memory, for a stack walk."""
        self._state(cpu.uc).flush(cpu.write_word)


# `ta n` leaves PC (and nPC) at the trap's nPC: the breakpoint's address + 4.
SPARC64 = Sparc64Quirks(uc_arch=unicorn.UC_ARCH_SPARC,
                        uc_mode=unicorn.UC_MODE_SPARC64 | unicorn.UC_MODE_BIG_ENDIAN,
                        consts=us, reg_prefix="UC_SPARC_REG_", trap_intno=TRAP_INTNO,
                        trap_pc_offset=4, special_regs={"ccr": _CCR, "y": _Y},
                        emu_until=_MASK)

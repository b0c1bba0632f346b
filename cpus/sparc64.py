"""sparc64: SPARC V9, 64-bit ABI, big-endian.  `ta 0x70` breakpoints, register windows,
delay slots, the stack bias.

What Unicorn 2.1.4 gives a sparc64 guest, measured (and what this backend does about it):

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
    `handle_arch_trap` spills or fills one window to or from its save area at
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
    machine's nested calls end through the __hc_call_return hook instead.
  * `emu_start(..., count)` is implemented with a code hook on every instruction, and a
    code hook on the delay slot of a `jmpl` (every `retl`) replaces the computed nPC with
    QEMU's "dynamic" marker 1: the CPU jumps to address 1.  The machine never uses it:
    quanta are counted in whole translation blocks on every arch (smpkprobes/_blockbudget),
    and block hooks leave nPC intact.

Calling convention (SPARC V9 64-bit ABI): arguments in %o0-%o5 (%i0-%i5 after `save`),
the 7th on at %sp + 2047 + 176 (16-word window save area, 6 argument home words), result
in %o0.  `call` leaves its own address in %o7 and a function returns to %o7 + 8; this
port's return addresses are those resume addresses (ri.ret_addr, stack traces), so a
kretprobe stores `kretprobe_trampoline - 8` in %o7.

Stepping strategy (Linux arch/sparc/kernel/kprobes.c steps one instruction out of line
with TNPC pointing at a second breakpoint and fixes branches up afterwards; Unicorn has no
writable nPC, so here a control transfer is stepped together with its delay slot):
  * ordinary instructions are copied into a slot followed by the breakpoint, or, boosted,
    by `ba,a` back to the next instruction;
  * `call`, `jmpl` (ret/retl/indirect calls), `rd %pc` and unconditional or never-taken
    branches whose delay slot is a nop are simulated;
  * a conditional branch (Bicc, BPcc, BPr, FBfcc, FBPfcc) is copied with its delay slot
    and re-targeted inside the slot: it ends on one of two breakpoints, not taken
    (resume after the delay slot) or taken (resume at the target), so the condition
    codes, which Unicorn does not expose, are evaluated by the CPU itself;
  * an instruction in a delay slot is refused (EINVAL): it executes as part of its
    branch's step, and a trap there would lose nPC;
  * `ta`/`tcc`, `illtrap`, `done`/`retry`, `return`, and control transfers whose delay
    slot is not a plain instruction (or, for call/jmpl, not a nop) are refused
    (EOPNOTSUPP).
"""

from __future__ import annotations

import ctypes
import re
import struct
from dataclasses import dataclass

import capstone
import unicorn
import unicorn.sparc_const as us

from ._base import (EINVAL, EOPNOTSUPP, CallingConvention, CpuBackend, InsnPlan, RegAccess,
                    StepKind, UnsteppableError)

_MASK = (1 << 64) - 1
BIAS = 2047                    # V9 stack bias: %sp + 2047 is the real stack pointer
FRAME_MIN = 176                # window save area (16 words) + 6 argument home words
NOP = 0x01000000
BREAKPOINT = 0x91D02070        # ta %icc, 0x70 (Linux sparc64's BREAKPOINT_INSTRUCTION)
TRAP_INTNO = 0x100 + 0x70      # Unicorn: TT_TRAP + (immediate & 0x7f)

_REGNAMES = tuple(f"{k}{i}" for k in "goli" for i in range(8))     # r0..r31
REGISTERS = {name: getattr(us, "UC_SPARC_REG_" + name.upper()) for name in _REGNAMES}
REGISTERS["pc"] = us.UC_SPARC_REG_PC
# Served from Unicorn's CPU state (its register API has neither): the condition codes
# (xcc << 4 | icc, V9's %ccr) and %y.
_CCR, _Y = -1, -2
REGISTERS.update(ccr=_CCR, y=_Y)


def _sext(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


# == instruction fields ===================================================================
def _op(w): return w >> 30
def _op2(w): return (w >> 22) & 7
def _op3(w): return (w >> 19) & 0x3F
def _rd(w): return (w >> 25) & 0x1F
def _rs1(w): return (w >> 14) & 0x1F
def _rs2(w): return w & 0x1F
def _imm(w): return (w >> 13) & 1
def _simm13(w): return _sext(w, 13)


# op=0 formats that are branches, with the width of their word displacement.
_BRANCHES = {1: 19,            # BPcc
             2: 22,            # Bicc
             3: 16,            # BPr (split d16hi:d16lo)
             5: 19,            # FBPfcc
             6: 22}            # FBfcc


def _branch_disp(w: int) -> int:
    """The byte displacement of a branch (op=0, op2 in _BRANCHES)."""
    op2 = _op2(w)
    if op2 == 3:
        return _sext((((w >> 20) & 3) << 14) | (w & 0x3FFF), 16) * 4
    return _sext(w, _BRANCHES[op2]) * 4


def _with_disp(w: int, words: int) -> int:
    """Branch `w` re-targeted `words` instructions away from itself."""
    op2 = _op2(w)
    if op2 == 3:
        return (w & ~((3 << 20) | 0x3FFF)) | (((words >> 14) & 3) << 20) | (words & 0x3FFF)
    bits = _BRANCHES[op2]
    return (w & ~((1 << bits) - 1)) | (words & ((1 << bits) - 1))


def _branch_kind(w: int) -> str:
    """'always', 'never' or 'cond' for a branch word."""
    if _op2(w) == 3:                           # BPr: rcond 1-3, 5-7; 0 and 4 reserved
        return "cond" if (w >> 25) & 3 else "reserved"
    cond = (w >> 25) & 0xF
    return "always" if cond == 8 else "never" if cond == 0 else "cond"


def _annul(w: int) -> bool:
    return bool((w >> 29) & 1)


def is_delayed_cti(w: int) -> bool:
    """A control transfer with a delay slot: branches, call, jmpl, return."""
    if _op(w) == 0:
        return _op2(w) in _BRANCHES
    if _op(w) == 1:
        return True
    return _op(w) == 2 and _op3(w) in (0x38, 0x39)


def _is_restore(w: int) -> bool:
    return _op(w) == 2 and _op3(w) == 0x3D


def _delay_slot_runs(w: int) -> bool:
    """Whether the instruction after CTI `w` ever executes as its delay slot (an annulled
    unconditional branch, taken or never, annuls it)."""
    if _op(w) == 0 and _annul(w) and _branch_kind(w) in ("always", "never"):
        return False
    return True


def _ba_a(frm: int, to: int) -> int:
    """`ba,a to`, placed at `frm` (Bicc: 22-bit word displacement, +-8 MiB)."""
    words = (to - frm) // 4
    if not -(1 << 21) <= words < (1 << 21):
        raise UnsteppableError(EOPNOTSUPP, f"{to:#x} is out of reach of a branch at {frm:#x}")
    return 0x30800000 | (words & 0x3FFFFF)


def _ba(frm: int, to: int) -> int:
    """`ba to` (not annulled: its delay slot runs), placed at `frm`."""
    return _ba_a(frm, to) & ~(1 << 29)


def _unfit_for_delay_slot(w: int) -> str | None:
    """Why `w` cannot be stepped as a copied delay slot, or None."""
    if is_delayed_cti(w):
        return "a control transfer (a DCTI couple)"
    if _op(w) == 0 and _op2(w) in (0, 7):
        return "an illegal instruction"
    if _op(w) == 2:
        op3 = _op3(w)
        if op3 == 0x3A:
            return "a trap instruction"
        if op3 in (0x3C, 0x3D, 0x2B):
            return "a register-window instruction (a window trap there cannot be retried)"
        if op3 == 0x3E:
            return "done/retry"
        if op3 == 0x28 and _rs1(w) == 5:
            return "rd %pc"
    return None


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


# == the calling convention ================================================================
@dataclass(frozen=True)
class Sparc64CallingConvention(CallingConvention):
    """SPARC V9 64-bit: %sp is biased by 2047; a return address is %o7 + 8."""

    def _stack(self, regs: RegAccess) -> int:
        return (regs.read(self.sp_reg) + BIAS) & _MASK

    def _arg_slot(self, regs: RegAccess, n: int) -> int:
        return self._stack(regs) + self.stack_args_offset + (n - len(self.arg_regs)) * 8

    def arg(self, regs: RegAccess, n: int) -> int:
        if n < len(self.arg_regs):
            return regs.read(self.arg_regs[n])
        return regs.read_word(self._arg_slot(regs, n))

    def set_arg(self, regs: RegAccess, n: int, value: int) -> None:
        if n < len(self.arg_regs):
            regs.write(self.arg_regs[n], value)
        else:
            regs.write_word(self._arg_slot(regs, n), value)

    def return_address_slot(self, regs: RegAccess) -> int | None:
        return None

    def get_return_address(self, regs: RegAccess) -> int:
        return (regs.read("o7") + 8) & _MASK

    def set_return_address(self, regs: RegAccess, value: int) -> None:
        regs.write("o7", value - 8)

    def emulate_return(self, regs: RegAccess, value: int | None = None) -> int:
        """`retl` of a leaf (the hypercall stubs run in their caller's window)."""
        if value is not None:
            regs.write(self.ret_reg, value)
        target = self.get_return_address(regs)
        regs.write(self.pc_reg, target)
        return target

    def setup_call(self, regs: RegAccess, stack_top: int, func: int, args: tuple[int, ...],
                   return_to: int) -> None:
        """A frame below `stack_top` with room for the callee's window save area, the
        argument home words and the stack arguments; its save area is zeroed so that a
        stack walk ends there (saved %i6 = %i7 = 0)."""
        stack = args[len(self.arg_regs):]
        sp = (stack_top - FRAME_MIN - 8 * len(stack)) & ~(self.stack_align - 1)
        for k in range(16):
            regs.write_word(sp + 8 * k, 0)
        for i, a in enumerate(stack):
            regs.write_word(sp + self.stack_args_offset + 8 * i, a & _MASK)
        for reg, a in zip(self.arg_regs, args):
            regs.write(reg, a & _MASK)
        regs.write(self.sp_reg, sp - BIAS)
        regs.write("o7", return_to - 8)
        regs.write(self.pc_reg, func)

    def stack_window(self, regs: RegAccess, arg_bytes: int) -> tuple[int, int]:
        """From the real stack pointer through the save area, the home words and
        `arg_bytes` of stack arguments."""
        return self._stack(regs), self.stack_args_offset + arg_bytes


# == the backend ===========================================================================
_TRAMPOLINE = 0x7FE000         # private per-CPU page (8 KiB, the sparc64 page size), within
                               # `ba` reach of all text and slots
_FIRMWARE_TRAPS = (0x24,)      # clean_window; spill 0x80-0xbf and fill 0xc0-0xff below


class Sparc64(CpuBackend):
    def __init__(self):
        super().__init__(
            name="sparc64", bits=64, endian="big",
            uc_arch=unicorn.UC_ARCH_SPARC,
            uc_mode=unicorn.UC_MODE_SPARC64 | unicorn.UC_MODE_BIG_ENDIAN,
            cs_arch=capstone.CS_ARCH_SPARC,
            cs_mode=capstone.CS_MODE_V9 | capstone.CS_MODE_BIG_ENDIAN,
            breakpoint=BREAKPOINT.to_bytes(4, "big"), trap_intno=TRAP_INTNO, trap_pc_offset=4,
            registers=REGISTERS,
            cc=Sparc64CallingConvention(word_bytes=8,
                                        arg_regs=("o0", "o1", "o2", "o3", "o4", "o5"),
                                        ret_reg="o0", sp_reg="o6", pc_reg="pc",
                                        return_address_reg="o7", stack_args_offset=FRAME_MIN,
                                        stack_align=16),
            # regs.flags is %ccr (from Unicorn's CPU state: see read_special).
            flags_reg="ccr", fp_reg="i6",
            # A control transfer is planned together with its delay slot.
            max_insn_len=8, fixed_insn_len=4, slot_size=64,
            # The window save area of the frame at (real) address fp: %i6 at +112,
            # %i7 at +120 (see unwind_frame).
            frame_saved_fp_offset=14 * 8, frame_ret_offset=15 * 8,
        )

    # -- Unicorn setup and the CPU state -----------------------------------------------------
    def uc_setup(self, uc) -> None:
        uc._sparc64_state = _CpuState(uc)
        uc.mem_map(_TRAMPOLINE, 0x2000, unicorn.UC_PROT_READ | unicorn.UC_PROT_EXEC)

    @staticmethod
    def _state(uc) -> _CpuState:
        return uc._sparc64_state

    def context_save(self, uc):
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

    def handle_arch_trap(self, cpu, intno: int) -> bool:
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

    # -- stack frames --------------------------------------------------------------------------
    def frame_start(self, cpu, regs) -> int:
        """Frame records live in register windows: flush them to their save areas (flushw,
        and the current window too), then start at the current frame's real %sp."""
        state = self._state(cpu.uc)
        state.flush(cpu.write_word)
        return (cpu.reg_read("o6") + BIAS) & _MASK

    def unwind_frame(self, read_word, fp: int) -> tuple[int, int]:
        """The frame whose window save area is at `fp`: its saved %i7 (the call that made
        it; the return address is 8 past it) and %i6 (the caller's biased %sp)."""
        i7 = read_word(fp + self.frame_ret_offset)
        i6 = read_word(fp + self.frame_saved_fp_offset)
        if i7 == 0:
            return 0, 0
        return (i7 + 8) & _MASK, (i6 + BIAS) & _MASK if i6 else 0

    def frame_pending(self, code: bytes) -> bool:
        """At the entry `save` the window is still the caller's, and after the closing
        `restore` (at its `retl`, and in that one's delay slot) it is the caller's again:
        the return address is then %o7 + 8."""
        if not code:
            return True
        last = [int.from_bytes(code[i:i + 4], "big")
                for i in range(max(0, len(code) - 8), len(code), 4)]
        return _is_restore(last[-1]) or (len(last) == 2 and _is_restore(last[0])
                                         and _op(last[1]) == 2 and _op3(last[1]) == 0x38)

    # -- stepping ------------------------------------------------------------------------------
    def plan_probe(self, text, addr: int) -> InsnPlan:
        prev = int.from_bytes(text(addr - 4, 4), "big")
        if is_delayed_cti(prev) and _delay_slot_runs(prev):
            raise UnsteppableError(
                EINVAL, f"{addr:#x} is the delay slot of `{self._mnemonic(prev, addr - 4)}`: "
                        f"it executes as part of that instruction's step (probe the branch)")
        return self.plan_insn(text(addr, self.max_insn_len), addr)

    def plan_insn(self, code: bytes, addr: int) -> InsnPlan:
        if len(code) < 4 or addr & 3:
            raise UnsteppableError(EINVAL, "instructions are 4 bytes, 4-byte aligned")
        w = int.from_bytes(code[:4], "big")
        mnem = self._mnemonic(w, addr)
        base = dict(addr=addr, orig=code[:4], mnemonic=mnem)
        op = _op(w)
        if op == 0 and _op2(w) in (0, 7):
            raise UnsteppableError(EOPNOTSUPP, f"{mnem}: illegal instruction")
        if op == 2:
            op3 = _op3(w)
            if op3 == 0x3A:
                raise UnsteppableError(EOPNOTSUPP, f"{mnem}: trap instruction (the kprobes "
                                                   f"breakpoint is `ta 0x70`)")
            if op3 == 0x3E:
                raise UnsteppableError(EOPNOTSUPP, f"{mnem}: return from trap")
            if op3 == 0x39:
                raise UnsteppableError(EOPNOTSUPP, f"{mnem}: `return` restores a window and "
                                                   f"jumps; it is not stepped")
            if op3 == 0x28 and _rs1(w) == 5:                 # rd %pc, %rd
                rd = _REGNAMES[_rd(w)]
                return InsnPlan(kind=StepKind.SIMULATE, length=4,
                                simulate=self._sim_rdpc(addr, rd), **base)
        if not is_delayed_cti(w):
            return InsnPlan(kind=StepKind.OUT_OF_LINE, length=4, boostable=True,
                            fixup=("copy",), **base)
        return self._plan_cti(w, code, addr, mnem)

    def _plan_cti(self, w: int, code: bytes, addr: int, mnem: str) -> InsnPlan:
        if len(code) < 8:
            raise UnsteppableError(EINVAL, f"{mnem}: its delay slot is not text")
        delay = int.from_bytes(code[4:8], "big")
        base = dict(addr=addr, orig=code[:8], mnemonic=mnem, length=8)
        why = None if delay == NOP else _unfit_for_delay_slot(delay)
        if why is not None:
            raise UnsteppableError(EOPNOTSUPP, f"{mnem}: its delay slot holds {why}")
        nxt = addr + 8
        if _op(w) == 1:                                      # call disp30
            target = (addr + _sext(w, 30) * 4) & _MASK
            if delay != NOP:
                raise UnsteppableError(EOPNOTSUPP, f"{mnem}: a call whose delay slot is not a "
                                                   f"nop (%o7 cannot be set from a slot)")
            return InsnPlan(kind=StepKind.SIMULATE, simulate=self._sim_call(addr, target),
                            **base)
        if _op(w) == 2:                                      # jmpl: ret, retl, indirect call
            if delay != NOP:
                raise UnsteppableError(EOPNOTSUPP, f"{mnem}: a jmpl whose delay slot is not a "
                                                   f"nop (its target is computed before it)")
            return InsnPlan(kind=StepKind.SIMULATE, simulate=self._sim_jmpl(addr, w), **base)
        kind = _branch_kind(w)
        if kind == "reserved":
            raise UnsteppableError(EOPNOTSUPP, f"{mnem}: reserved branch condition")
        target = (addr + _branch_disp(w)) & _MASK
        if kind in ("always", "never"):
            dest = target if kind == "always" else nxt
            if delay == NOP or _annul(w):
                return InsnPlan(kind=StepKind.SIMULATE, simulate=self._sim_jump(dest), **base)
            # The delay slot runs, then the branch goes (or not): copy the slot alone.
            return InsnPlan(kind=StepKind.OUT_OF_LINE, boostable=True,
                            fixup=("delay", delay, dest), exits=((4, dest),), **base)
        # Conditional: the CPU evaluates the condition in the slot, with the delay slot
        # (annulled or not, as in the original) and two exits.
        return InsnPlan(kind=StepKind.OUT_OF_LINE, boostable=True,
                        fixup=("cond", _with_disp(w, 4), delay, target), exits=((16, target),),
                        **base)

    def slot_code(self, plan: InsnPlan, slot_addr: int, boost: bool) -> bytes:
        """Ordinary:    insn; bp                  (boost: insn; ba,a addr+4)
        delay + jump:   delay; bp                 (boost: delay; ba,a dest)
        conditional:    b<cond> .+16; delay; bp; bp; bp
                        (boost: the first and last bp are ba,a addr+8 and ba,a target)."""
        kind = plan.fixup[0]

        def tail(at: int, to: int) -> int:
            return _ba_a(slot_addr + at, to) if boost else BREAKPOINT

        if kind == "copy":
            words = [int.from_bytes(plan.orig, "big"), tail(4, plan.addr + plan.length)]
        elif kind == "delay":
            _, delay, dest = plan.fixup
            words = [delay, tail(4, dest)]
        else:
            _, branch, delay, target = plan.fixup
            words = [branch, delay, tail(8, plan.addr + plan.length), BREAKPOINT,
                     tail(16, target)]
        return b"".join(x.to_bytes(4, "big") for x in words)

    # -- simulations ---------------------------------------------------------------------------
    @staticmethod
    def _sim_jump(dest: int):
        return lambda r: r.write("pc", dest)

    @staticmethod
    def _sim_call(addr: int, target: int):
        def call(r: RegAccess):
            r.write("o7", addr)
            r.write("pc", target)
        return call

    @staticmethod
    def _sim_jmpl(addr: int, w: int):
        rs1, rd = _REGNAMES[_rs1(w)], _rd(w)
        if _imm(w):
            simm = _simm13(w)
            operand = lambda r: simm                               # noqa: E731
        else:
            rs2 = _REGNAMES[_rs2(w)]
            operand = lambda r: r.read(rs2)                        # noqa: E731

        def jmpl(r: RegAccess):
            target = (r.read(rs1) + operand(r)) & _MASK
            if rd:
                r.write(_REGNAMES[rd], addr)
            r.write("pc", target)
        return jmpl

    @staticmethod
    def _sim_rdpc(addr: int, rd: str):
        def rdpc(r: RegAccess):
            if rd != "g0":
                r.write(rd, addr)
            r.write("pc", addr + 4)
        return rdpc

    def _mnemonic(self, w: int, addr: int) -> str:
        insn = next(self.disassembler().disasm(w.to_bytes(4, "big"), addr, 1), None)
        if insn is None:
            return f".word {w:#010x}"
        return f"{insn.mnemonic} {insn.op_str}".strip()


BACKEND = Sparc64()

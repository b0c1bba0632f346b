"""sparc64 instruction encodings: fields, branches, the few instructions the backend builds.

Shared by the ISA backend (cpus/sparc64.py) and its Unicorn quirks (cpus/_unicorn_sparc64.py).
"""

from __future__ import annotations

from ._base import EOPNOTSUPP, UnsteppableError

_MASK = (1 << 64) - 1
BIAS = 2047                    # V9 stack bias: %sp + 2047 is the real stack pointer
FRAME_MIN = 176                # window save area (16 words) + 6 argument home words
NOP = 0x01000000
BREAKPOINT = 0x91D02070        # ta %icc, 0x70 (Linux sparc64's BREAKPOINT_INSTRUCTION)

_REGNAMES = tuple(f"{k}{i}" for k in "goli" for i in range(8))     # r0..r31


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


"""arm: 32-bit ARM in ARM state (A32, little-endian), AAPCS, BKPT breakpoints.

The breakpoint is `BKPT #0` (0xe1200070).  Linux uses an undefined instruction (0xe7f001f8)
as its ARM breakpoint, which Unicorn cannot deliver as a trap (cpus/_unicorn.py), so BKPT is
the only choice.  YIELD and WFE end Unicorn's emulation too (the guest's cpu_relax is a NOP).

Register names: r0..r12, sp, lr, pc, cpsr; a kprobe_events fetch-arg also takes the kernel's
(arch/arm/kernel/ptrace.c regoffset_table): fp for r11 and ip for r12 - on arm `%ip` is the
intra-procedure scratch register, not the PC.  The kernel's ORIG_r0 is not modelled.

The frame record: clang's ARM-state prologue is `push {..., r11, lr}; add r11, sp, #N`, so
r11 (fp) points at the saved r11 and the saved lr sits just above it (offsets 0 and 4).
Leaf functions get no frame record at all on ARM (LLVM keeps r11 only in functions that
make calls), so inside a leaf the return address is still in lr: see `frame_pending`.

Stepping strategy (after arch/arm/probes, written afresh from the ARM ARM encodings):
  * an instruction that neither reads nor writes pc is copied into a slot and followed by
    a BKPT that ends the step or, when boosted, by a `b` back to the next instruction.
    Conditional instructions keep their condition: a failed condition falls through to
    the BKPT just like a passed one;
  * every instruction that reads or writes pc is simulated, with its condition code
    evaluated from the CPSR: B, BL, BLX (immediate and register), BX, data processing with
    pc as an operand or destination (`mov lr, pc`, `add r0, pc, #8` = ADR, `mov pc, lr`),
    LDR/LDRB/LDRH/LDRSB/LDRSH/LDRD with a pc base (literal loads) and LDR into pc, STR of
    pc, LDM into pc (`pop {..., pc}`, the usual return) and STM of pc, and PLD/PLI of a
    literal (a hint: nothing to do);
  * refused: BKPT (EOPNOTSUPP, the breakpoint itself), UDF and clang's `trap`, SVC, HVC,
    SMC, ERET and exception returns (`subs pc, lr, #4`, `movs pc, ...`, `ldm ... ^`), the
    exclusives (LDREX/STREX and their byte, halfword, doubleword and acquire/release
    forms, as Linux does and as arm64 refuses LDXR/STXR: on hardware the return from the
    breakpoint exception clears the local monitor), WFI/WFE,
    CPS/SETEND/SRS/RFE, and any other pc-relative form that is UNPREDICTABLE or that this
    backend does not simulate (flag-setting data processing with a pc operand,
    register-shifted registers with pc, coprocessor loads from pc, ...).
"""

from __future__ import annotations

import capstone

from . import _unicorn
from ._arm_insn import _PC_BIAS, BKPT, COND_AL, _plan, _Refuse, _touches_pc
from ._base import (EINVAL, EOPNOTSUPP, CallingConvention, CpuBackend, InsnPlan, Register,
                    StepKind, UnsteppableError)

ARG_REGS = ("r0", "r1", "r2", "r3")
REGISTERS = (
    *(Register(f"r{i}", 4, {11: ("fp",), 12: ("ip",)}.get(i, ()), general_purpose=True,
               argument=f"r{i}" in ARG_REGS) for i in range(13)),
    Register("sp", 4),
    Register("lr", 4),
    Register("pc", 4),
    Register("cpsr", 4, ("flags",)),
)

# The FSR kprobe_page_fault(regs, fsr) gets for a read of an unmapped kernel address: a
# translation fault (page), short-descriptor format.
FSR_TRANSLATION_PAGE = 0x007


class Arm(CpuBackend):
    def __init__(self):
        super().__init__(
            name="arm", bits=32, endian="little",
            cs_arch=capstone.CS_ARCH_ARM, cs_mode=capstone.CS_MODE_ARM,
            breakpoint=BKPT.to_bytes(4, "little"),
            register_file=REGISTERS,
            cc=CallingConvention(word_bytes=4, arg_regs=ARG_REGS,
                                 ret_reg="r0", sp_reg="sp", pc_reg="pc",
                                 return_address_reg="lr", stack_args_offset=0, stack_align=8,
                                 # AAPCS: four register arguments, then the stack.
                                 default_arg_count=6),
            unicorn=_unicorn.ARM,
            page_fault_trapnr=FSR_TRANSLATION_PAGE,
            flags_reg="cpsr", fp_reg="r11", max_insn_len=4, fixed_insn_len=4,
            # One half for the stepped copy + BKPT, one for the boosted copy + `b` back.
            slot_size=16,
            frame_saved_fp_offset=0, frame_ret_offset=4,
        )

    def is_trap_insn(self, code: bytes) -> bool:
        """Any BKPT #imm traps with interrupt 7, not only the kprobes one."""
        return len(code) == 4 and int.from_bytes(code, "little") & 0x0FF000F0 == 0x01200070

    def frame_pending(self, code: bytes) -> bool:
        """Whether the frame record is not built yet at the end of `code` (the function from
        its entry up to the current instruction).  clang's prologue is `push {..., r11,
        lr}` directly followed by `mov r11, sp` or `add r11, sp, #N`; leaf functions have
        neither, so anywhere in a leaf the return address is still in lr.  Either half of
        the pair suffices, so a probe (a BKPT) on the other half does not hide the frame."""
        n = len(code) // 4
        for i in range(n):
            w = int.from_bytes(code[4 * i:4 * i + 4], "little")
            if w & 0xFFFFF000 == 0xE28DB000 or w == 0xE1A0B00D:     # add/mov r11, sp
                return False
            if w & 0xFFFF4800 == 0xE92D4800 and i + 1 < n:            # push {.., r11, lr}
                return False
        return True

    # -- stepping -------------------------------------------------------------------------
    def plan_insn(self, code: bytes, addr: int) -> InsnPlan:
        if len(code) < 4:
            raise UnsteppableError(EINVAL, "truncated instruction")
        if addr & 3:
            raise UnsteppableError(EINVAL, "ARM-state instructions are word aligned")
        w = int.from_bytes(code[:4], "little")
        insn = next(self.disassembler().disasm(code[:4], addr, 1), None)
        if insn is None:
            raise UnsteppableError(EOPNOTSUPP, f"cannot decode instruction {w:#010x}")
        text = f"{insn.mnemonic} {insn.op_str}".strip()
        base = dict(addr=addr, length=4, orig=bytes(code[:4]), mnemonic=text)
        try:
            sim = _plan(w, addr)
            if sim is None and _touches_pc(insn):
                raise _Refuse(EOPNOTSUPP, "reads or writes pc in a form that is neither "
                                          "stepped out of line nor simulated")
        except _Refuse as r:
            raise UnsteppableError(r.errno, f"{text}: {r.reason}") from None
        if sim is not None:
            return InsnPlan(kind=StepKind.SIMULATE, simulate=sim, **base)
        return InsnPlan(kind=StepKind.OUT_OF_LINE, boostable=True, **base)

    def slot_code(self, plan: InsnPlan, slot_addr: int, boost: bool) -> bytes:
        """The copied instruction (it never involves pc, so it needs no fixup) and its tail:
        BKPT, or `b <probed address + 4>`."""
        if not boost:
            return plan.orig + self.breakpoint
        here = slot_addr + 4
        off = plan.addr + 4 - (here + _PC_BIAS)
        if not -(1 << 25) <= off < (1 << 25):
            raise UnsteppableError(EOPNOTSUPP, "probed address out of `b` range of the slot")
        b = (COND_AL << 28) | 0x0A000000 | ((off >> 2) & 0xFFFFFF)
        return plan.orig + b.to_bytes(4, "little")


BACKEND = Arm()

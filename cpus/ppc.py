"""ppc: 32-bit PowerPC, big-endian, SysV ABI; `tw 31,0,0` breakpoints, LR return addresses.

How Unicorn reports `tw 31,0,0` (0x7fe00008, Linux's BREAKPOINT_INSN), and why the CPU
model is a 750: cpus/_unicorn.py.  The machine oopses the task on any interrupt other than
the breakpoint's (`sc`, an illegal instruction).

Register names: r0..r31, pc, lr, ctr, cr, xer, msr; a kprobe_events fetch-arg also takes the
kernel's (arch/powerpc/kernel/ptrace/ptrace.c regoffset_table): gpr0..gpr31, nip, link,
ccr.  The kernel's trap, dar, dsisr and mq are not modelled.

Stepping strategy, after arch/powerpc/kernel/kprobes.c (written afresh):
  * every instruction is 4 bytes, and only branches read or write the PC, so all branches
    (b/ba/bl/bla, bc*, bclr*, bcctr*) are simulated: the decrement of CTR, the CR bit test,
    the link (LR = addr + 4) and the target are computed from the registers;
  * everything else is copied into a slot unchanged (no PC-relative fixups exist on ppc32),
    followed by the breakpoint, or, when boosted, by a `b` back to the next instruction;
  * refused: the trap instructions (`tw`/`twi`/`td`/`tdi`, the breakpoint included) and `sc`
    (EOPNOTSUPP); `rfi`/`rfci`/`rfmci`/`rfid` and `mtmsr`/`mtmsrd` (EINVAL, as Linux);
    load-reserve / store-conditional (`lwarx`, `stwcx.` and their byte, half and double
    forms: EOPNOTSUPP), the counterpart of arm64's exclusives: on the hardware simulated, the
    probe's interrupt between the two loses the reservation (Linux's interrupt return even
    clears it with a dummy stcx.), so a probed atomic loop would retry for ever;
    instructions capstone cannot decode (EOPNOTSUPP).

A probe on another instruction *inside* an LL/SC loop (do_fork+0x1c, between lwarx and
stwcx.) fires once per iteration: under SMP contention stwcx. fails and the loop runs again,
so such a probe can count more hits than calls - correct kprobes semantics, not a miss.

Stack frames (SysV ppc32): `stwu r1,-N(r1)` stores the back chain, so 0(r1) of every frame is
the caller's r1, and a function saves its LR in the LR save word at 4(r1) of its *caller's*
frame.  The walk therefore starts from r1 and finds a frame's return address one frame up
(`unwind_frame`).
"""

from __future__ import annotations

from dataclasses import dataclass

import capstone

from . import _unicorn
from ._base import (EINVAL, EOPNOTSUPP, CallingConvention, CpuBackend, InsnPlan, RegAccess,
                    Register, StepKind, UnsteppableError)

ARG_REGS = tuple(f"r{i}" for i in range(3, 11))

REGISTERS = (
    *(Register(f"r{i}", 4, (f"gpr{i}", "sp") if i == 1 else (f"gpr{i}",),
               general_purpose=True, argument=f"r{i}" in ARG_REGS) for i in range(32)),
    Register("pc", 4, ("nip", "ip")),
    Register("lr", 4, ("link",)),
    Register("ctr", 4),
    Register("cr", 4, ("ccr", "flags")),
    Register("xer", 4),
    Register("msr", 4),
)

BREAKPOINT = 0x7FE00008            # tw 31,0,0
_MASK = 0xFFFFFFFF

# Primary opcode 31, extended opcode (bits 21-30) -> why it is refused.
_RESERVATIONS = {20: "lwarx", 84: "ldarx", 52: "lbarx", 116: "lharx",
                 150: "stwcx.", 214: "stdcx.", 694: "stbcx.", 726: "sthcx."}
_MSR_WRITES = {146: "mtmsr", 178: "mtmsrd"}
# Primary opcode 19, extended opcode -> interrupt returns.
_RFI = {50: "rfi", 51: "rfci", 38: "rfmci", 18: "rfid", 274: "hrfid"}


@dataclass(frozen=True)
class PpcCallingConvention(CallingConvention):
    """SysV ppc32: LR holds the return address; the caller's frame (back chain at 0, LR save
    word at 4, overflow arguments from 8) is above the callee's r1."""

    def setup_call(self, regs: RegAccess, stack_top: int, func: int, args: tuple[int, ...],
                   return_to: int) -> None:
        nstack = max(0, len(args) - len(self.arg_regs))
        # A minimal caller frame: back chain + LR save word + the overflow arguments.
        sp = stack_top - self.stack_args_offset - nstack * self.word_bytes
        sp -= sp % self.stack_align
        regs.write_word(sp, 0)            # back chain 0 ends every stack walk
        regs.write_word(sp + self.word_bytes, 0)
        for i, a in enumerate(args[len(self.arg_regs):]):
            regs.write_word(sp + self.stack_args_offset + i * self.word_bytes, a & _MASK)
        regs.write(self.sp_reg, sp)
        regs.write(self.return_address_reg, return_to)
        for reg, a in zip(self.arg_regs, args):
            regs.write(reg, a & _MASK)
        regs.write(self.pc_reg, func)


def _simm(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _bc_taken(bo: int, bi: int, r: RegAccess) -> bool:
    """The BO/BI condition of a conditional branch, decrementing CTR when BO says so."""
    ctr_ok = True
    if not bo & 0x04:
        ctr = (r.read("ctr") - 1) & _MASK
        r.write("ctr", ctr)
        ctr_ok = (ctr != 0) != bool(bo & 0x02)
    cond_ok = True
    if not bo & 0x10:
        bit = (r.read("cr") >> (31 - bi)) & 1
        cond_ok = bit == bool(bo & 0x08)
    return ctr_ok and cond_ok


class Ppc(CpuBackend):
    def __init__(self):
        super().__init__(
            name="ppc", bits=32, endian="big",
            cs_arch=capstone.CS_ARCH_PPC,
            cs_mode=capstone.CS_MODE_32 | capstone.CS_MODE_BIG_ENDIAN,
            breakpoint=BREAKPOINT.to_bytes(4, "big"),
            register_file=REGISTERS,
            cc=PpcCallingConvention(word_bytes=4, arg_regs=ARG_REGS,
                                    ret_reg="r3", sp_reg="r1", pc_reg="pc",
                                    return_address_reg="lr", stack_args_offset=8,
                                    stack_align=16,
                                    # SysV ppc32: eight integer argument registers.
                                    default_arg_count=8),
            unicorn=_unicorn.PPC,
            # do_page_fault: kprobe_page_fault(regs, 11).
            page_fault_trapnr=11,
            flags_reg="cr", fp_reg="r1", max_insn_len=4, fixed_insn_len=4, slot_size=16,
            frame_saved_fp_offset=0, frame_ret_offset=4,
        )

    # -- stack frames -----------------------------------------------------------------------
    def unwind_frame(self, read_word, fp: int) -> tuple[int, int]:
        """The frame at `fp` (an r1 value): its back chain is the caller's r1, and its return
        address is in the caller's LR save word.  A chain that does not go up ends the walk."""
        try:
            caller = read_word(fp + self.frame_saved_fp_offset)
            if caller <= fp:
                return 0, caller
            return read_word(caller + self.frame_ret_offset), caller
        except ValueError:          # the back chain left mapped memory
            return 0, 0

    def frame_pending(self, code: bytes) -> bool:
        """Until the prologue's `stwu r1,-N(r1)` (or `stwux r1,r1,rN`) has run, r1 is still
        the caller's frame and the return address is only certain in LR (clang saves LR
        into the caller's frame *before* the stwu)."""
        for off in range(0, len(code) - 3, 4):
            word = int.from_bytes(code[off:off + 4], "big")
            if word >> 16 == 0x9421:                               # stwu r1, d(r1)
                return False
            if word & 0xFFFF07FF == 0x7C21016E:                    # stwux r1, r1, rB
                return False
        return True

    # -- stepping -----------------------------------------------------------------------------
    def plan_insn(self, code: bytes, addr: int) -> InsnPlan:
        if len(code) < 4 or addr & 3:
            raise UnsteppableError(EINVAL, "instructions are 4 bytes, 4-byte aligned")
        word = int.from_bytes(code[:4], "big")
        insn = next(self.disassembler().disasm(code[:4], addr, 1), None)
        if insn is None:
            raise UnsteppableError(EOPNOTSUPP, f"cannot decode instruction {word:#010x}")
        text = f"{insn.mnemonic} {insn.op_str}".strip()
        base = dict(addr=addr, length=4, orig=bytes(code[:4]), mnemonic=text)
        self._refuse(word, text)
        sim = self._simulation(word, addr, text)
        if sim is not None:
            return InsnPlan(kind=StepKind.SIMULATE, simulate=sim, **base)
        return InsnPlan(kind=StepKind.OUT_OF_LINE, boostable=True, **base)

    def slot_code(self, plan: InsnPlan, slot_addr: int, boost: bool) -> bytes:
        """The copied instruction (ppc32 has no PC-relative data accesses: no fixup), then the
        breakpoint, or `b` back to the instruction after the probe when boosting."""
        if not boost:
            return plan.orig + self.breakpoint
        rel = plan.addr + plan.length - (slot_addr + 4)
        if not -(1 << 25) <= rel < (1 << 25):
            raise UnsteppableError(EOPNOTSUPP, "probe address out of `b` range of the slot")
        return plan.orig + ((18 << 26) | (rel & 0x03FFFFFC)).to_bytes(4, "big")

    @staticmethod
    def _refuse(word: int, text: str) -> None:
        op = word >> 26
        xo = (word >> 1) & 0x3FF
        if word == BREAKPOINT:
            raise UnsteppableError(EOPNOTSUPP, f"{text}: the breakpoint instruction itself")
        if op in (2, 3) or (op == 31 and xo in (4, 68)):          # twi, tdi, tw, td
            raise UnsteppableError(EOPNOTSUPP, f"{text}: trap instruction")
        if op == 17:
            raise UnsteppableError(EOPNOTSUPP, f"{text}: system call")
        if op == 19 and xo in _RFI:
            raise UnsteppableError(EINVAL, f"{text}: interrupt return (rfi/rfid) cannot be "
                                           f"probed")
        if op == 31 and xo in _MSR_WRITES:
            raise UnsteppableError(EINVAL, f"{text}: writes the MSR (mtmsr[d]) and cannot be "
                                           f"probed")
        if op == 31 and xo in _RESERVATIONS:
            raise UnsteppableError(
                EOPNOTSUPP, f"{text}: load-reserve/store-conditional; the probe's interrupt "
                            f"between the larx and the stcx. loses the reservation, so the "
                            f"atomic loop would never complete")
        if op == 19 and xo == 560:
            raise UnsteppableError(EOPNOTSUPP, f"{text}: bctar (no TAR on 32-bit PowerPC)")

    @staticmethod
    def _simulation(word: int, addr: int, text: str):
        op = word >> 26
        aa, lk = word & 2, word & 1
        nxt = (addr + 4) & _MASK
        if op == 18:                                   # b, ba, bl, bla
            target = (_simm(word & 0x03FFFFFC, 26) + (0 if aa else addr)) & _MASK

            def branch(r: RegAccess):
                if lk:
                    r.write("lr", nxt)
                r.write("pc", target)
            return branch
        if op == 16:                                   # bc, bca, bcl, bcla
            bo, bi = (word >> 21) & 31, (word >> 16) & 31
            target = (_simm(word & 0xFFFC, 16) + (0 if aa else addr)) & _MASK

            def cond_branch(r: RegAccess):
                taken = _bc_taken(bo, bi, r)
                if lk:
                    r.write("lr", nxt)
                r.write("pc", target if taken else nxt)
            return cond_branch
        if op == 19 and ((word >> 1) & 0x3FF) in (16, 528):   # bclr[l], bcctr[l]
            bo, bi = (word >> 21) & 31, (word >> 16) & 31
            via = "lr" if ((word >> 1) & 0x3FF) == 16 else "ctr"
            if via == "ctr" and not bo & 0x04:
                raise UnsteppableError(EINVAL, f"{text}: invalid form (bcctr decrementing CTR)")

            def reg_branch(r: RegAccess):
                target = r.read(via) & ~3 & _MASK       # read before the link overwrites LR
                taken = _bc_taken(bo, bi, r)
                if lk:
                    r.write("lr", nxt)
                r.write("pc", target if taken else nxt)
            return reg_branch
        return None


BACKEND = Ppc()

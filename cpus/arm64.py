"""arm64 (AArch64, little-endian): BRK breakpoints, AAPCS64, simulated PC-relative instructions.

Breakpoint: `brk #0x4` (0xd4200080), the immediate Linux uses for KPROBES_BRK_IMM.  The
same BRK ends a single-step in a slot; the probe core tells the two apart by address.

Register names: x0..x30, sp, pc, nzcv; a kprobe_events fetch-arg also takes the kernel's
(arch/arm64/kernel/ptrace.c regoffset_table): lr for x30 and pstate, which reads the
condition flags at their PSTATE positions (the other PSTATE bits are not modelled).

Stepping strategy, following arch/arm64/kernel/probes (written afresh from the architecture
manual's encodings):
  * every instruction is 4 bytes, and only a few classes read the PC.  Everything else is
    copied into a slot and followed by the BRK that ends the step, or, when boosted, by a
    `b` back to the next instruction (the slots are well within B's +-128 MiB of the text);
  * the PC-relative and control-flow classes cannot run anywhere but at their own address,
    so they are simulated on the trapped registers: B, BL, B.cond, CBZ/CBNZ, TBZ/TBNZ, ADR,
    ADRP, LDR/LDRSW (literal), PRFM (literal, a no-op), BR, BLR and RET;
  * refused, with EINVAL as Linux's arch_prepare_kprobe returns for INSN_REJECTED:
      - the exception generators (SVC, HVC, SMC, BRK, HLT, DCPS*) and ERET/DRPS and the
        pointer-authenticated branches (they trap or change exception level);
      - load/store exclusives (LDXR/STXR, LDAXR/STLXR, LDXP/STXP, ...): a trap taken between
        the exclusive load and the store clears the monitor on real hardware, so the store
        would fail for ever;
      - MSR (writes PSTATE or a system register of the trap context), MRS of DAIF (reads
        the trap context's interrupt mask), WFI/WFE (would wait for an interrupt);
      - FP/SIMD literal loads (the probe core's register file is the integer one);
      - UDF and anything capstone cannot decode (unallocated encodings).

Instructions *between* an exclusive load and its store (do_fork's `add`) stay probeable.
Linux once refused them by scanning backwards for an open LDXR; here the exclusive monitor is
Unicorn's, and it survives the trap and the out-of-line step (measured: 100 fork_loop calls
with a post_handler probe on that `add`, 1 CPU, give exactly 100 hits, so no STLXR retried),
while a store that really lost the monitor to another CPU retries as it should.

Only `brk #0x4` is ours, but every BRK raises the same interrupt (clang's -trap-unreachable
emits `brk #0x1`), so `is_trap_insn` recognises all of them: a foreign BRK is an oops, not a
probe removed under a trapped CPU.
"""

from __future__ import annotations

import capstone

from . import _unicorn
from ._base import (EINVAL, EOPNOTSUPP, CallingConvention, CpuBackend, InsnPlan, RegAccess,
                    Register, StepKind, UnsteppableError)

ARG_REGS = tuple(f"x{n}" for n in range(8))

REGISTERS = (
    *(Register(f"x{n}", 8, general_purpose=True, argument=n < 8) for n in range(30)),
    Register("x30", 8, ("lr",), general_purpose=True),
    Register("sp", 8),
    Register("pc", 8, ("ip",)),
    Register("nzcv", 8, ("pstate", "flags")),
)

# The ESR kprobe_page_fault(regs, esr) gets for a read of an unmapped kernel address: a data
# abort from the current EL (EC 0x25), 32-bit instruction (IL), level 3 translation fault.
ESR_DABT_TRANSLATION = 0x25 << 26 | 1 << 25 | 0x07

BRK_KPROBES = 0xD4200080          # brk #0x4
_MASK = (1 << 64) - 1

# NZCV bits, as Unicorn reports the NZCV register (bits 31..28).
N, Z, C, V = 1 << 31, 1 << 30, 1 << 29, 1 << 28

# Condition codes 0..15 (EQ NE CS CC MI PL VS VC HI LS GE LT GT LE AL NV).
_CONDITIONS = (
    lambda f: bool(f & Z), lambda f: not f & Z,
    lambda f: bool(f & C), lambda f: not f & C,
    lambda f: bool(f & N), lambda f: not f & N,
    lambda f: bool(f & V), lambda f: not f & V,
    lambda f: bool(f & C) and not f & Z, lambda f: not (f & C and not f & Z),
    lambda f: bool(f & N) == bool(f & V), lambda f: bool(f & N) != bool(f & V),
    lambda f: not f & Z and bool(f & N) == bool(f & V),
    lambda f: bool(f & Z) or bool(f & N) != bool(f & V),
    lambda f: True, lambda f: True,
)


def _sext(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _read_x(r: RegAccess, n: int) -> int:
    """Xn, where register number 31 is XZR in every encoding simulated here."""
    return 0 if n == 31 else r.read(f"x{n}")


def _write_x(r: RegAccess, n: int, value: int) -> None:
    if n != 31:
        r.write(f"x{n}", value & _MASK)


class Arm64(CpuBackend):
    def __init__(self):
        super().__init__(
            name="arm64", bits=64, endian="little",
            cs_arch=capstone.CS_ARCH_ARM64, cs_mode=capstone.CS_MODE_ARM,
            breakpoint=BRK_KPROBES.to_bytes(4, "little"),
            register_file=REGISTERS,
            cc=CallingConvention(word_bytes=8, arg_regs=ARG_REGS,
                                 ret_reg="x0", sp_reg="sp", pc_reg="pc",
                                 return_address_reg="x30", stack_args_offset=0, stack_align=16,
                                 # AAPCS64: eight integer argument registers.
                                 default_arg_count=8),
            unicorn=_unicorn.ARM64,
            page_fault_trapnr=ESR_DABT_TRANSLATION,
            flags_reg="nzcv", fp_reg="x29",
            # The frame record: [x29] = the caller's x29, [x29 + 8] = the saved x30.
            frame_saved_fp_offset=0, frame_ret_offset=8,
            max_insn_len=4, fixed_insn_len=4,
            # Two 8-byte halves: copy + BRK, and copy + `b` back (boosted).
            slot_size=16,
        )

    def is_trap_insn(self, code: bytes) -> bool:
        """Every `brk #imm` raises interrupt 7, not only the kprobes one: clang's
        __builtin_trap / -trap-unreachable emit `brk #0x1`."""
        return len(code) >= 4 and int.from_bytes(code[:4], "little") & 0xFFE0001F == 0xD4200000

    # -- stepping -------------------------------------------------------------------------
    def plan_insn(self, code: bytes, addr: int) -> InsnPlan:
        if len(code) < 4:
            raise UnsteppableError(EOPNOTSUPP, "truncated instruction")
        orig = bytes(code[:4])
        insn = int.from_bytes(orig, "little")
        cs = next(self.disassembler().disasm(orig, addr, 1), None)
        if cs is None:
            raise UnsteppableError(EINVAL, f"{insn:#010x}: cannot decode (undefined instruction)")
        text = f"{cs.mnemonic} {cs.op_str}".strip()
        base = dict(addr=addr, length=4, orig=orig, mnemonic=text)
        reason = self._refusal(insn)
        if reason is not None:
            raise UnsteppableError(EINVAL, f"{text}: {reason}")
        sim = self._simulation(insn, addr)
        if sim is not None:
            return InsnPlan(kind=StepKind.SIMULATE, simulate=sim, **base)
        return InsnPlan(kind=StepKind.OUT_OF_LINE, boostable=True, **base)

    def slot_code(self, plan: InsnPlan, slot_addr: int, boost: bool) -> bytes:
        """The copy (position independent: PC readers are simulated), then the BRK that ends
        the step or a `b` back to the instruction after the probed one."""
        if not boost:
            return plan.orig + self.breakpoint
        rel = plan.addr + 4 - (slot_addr + 4)
        if not -(1 << 27) <= rel < (1 << 27):
            raise UnsteppableError(EOPNOTSUPP, "slot out of reach of a branch back")
        b = 0x14000000 | ((rel >> 2) & 0x3FFFFFF)
        return plan.orig + b.to_bytes(4, "little")

    @staticmethod
    def _refusal(insn: int) -> str | None:
        if insn & 0xFFFF0000 == 0:
            return "udf: permanently undefined"
        if insn & 0xFF000000 == 0xD4000000:
            return "exception generating instruction (svc/hvc/smc/brk/hlt/dcps)"
        if insn & 0xFE000000 == 0xD6000000:
            opc = (insn >> 21) & 0xF
            plain = insn & 0xFFFFFC1F in (0xD61F0000, 0xD63F0000, 0xD65F0000)
            if not plain:
                return ("exception return" if opc in (4, 5) else
                        "authenticated or unallocated register branch")
            return None
        if insn & 0x3F000000 == 0x08000000 and not insn & (1 << 23):
            return ("load/store exclusive: the trap between the exclusive load and store "
                    "would clear the monitor")
        if insn & 0xFFC00000 == 0xD5000000:          # system instructions
            if insn & 0xFFFFF01F == 0xD503201F:      # hints
                crm_op2 = (insn >> 5) & 0x7F
                if crm_op2 in (2, 3):
                    return "wfe/wfi would wait for an event or interrupt"
                return None
            if insn & 0xFFF00000 == 0xD5100000 or insn & 0xFFF8F01F == 0xD500401F:
                return "msr writes PSTATE or a system register of the trap context"
            if insn & 0xFFFFFFE0 == 0xD53B4220:
                return "mrs of DAIF reads the trap context's interrupt mask"
            return None
        if insn & 0x3F000000 == 0x1C000000:
            return "FP/SIMD literal load"
        return None

    def _simulation(self, insn: int, addr: int):
        nxt = addr + 4
        if insn & 0x7C000000 == 0x14000000:                      # B, BL
            target = (addr + (_sext(insn, 26) << 2)) & _MASK
            if insn >> 31:
                def bl(r: RegAccess):
                    r.write("x30", nxt)
                    r.write("pc", target)
                return bl
            return lambda r: r.write("pc", target)
        if insn & 0xFF000010 == 0x54000000:                      # B.cond
            target = (addr + (_sext(insn >> 5, 19) << 2)) & _MASK
            cond = _CONDITIONS[insn & 0xF]
            return lambda r: r.write("pc", target if cond(r.read("nzcv")) else nxt)
        if insn & 0x7E000000 == 0x34000000:                      # CBZ, CBNZ
            target = (addr + (_sext(insn >> 5, 19) << 2)) & _MASK
            rt, nonzero = insn & 0x1F, bool(insn & (1 << 24))
            width = _MASK if insn >> 31 else 0xFFFFFFFF

            def cb(r: RegAccess):
                taken = (_read_x(r, rt) & width != 0) == nonzero
                r.write("pc", target if taken else nxt)
            return cb
        if insn & 0x7E000000 == 0x36000000:                      # TBZ, TBNZ
            target = (addr + (_sext(insn >> 5, 14) << 2)) & _MASK
            rt, nonzero = insn & 0x1F, bool(insn & (1 << 24))
            bit = ((insn >> 31) << 5) | ((insn >> 19) & 0x1F)

            def tb(r: RegAccess):
                taken = bool(_read_x(r, rt) >> bit & 1) == nonzero
                r.write("pc", target if taken else nxt)
            return tb
        if insn & 0x1F000000 == 0x10000000:                      # ADR, ADRP
            rd = insn & 0x1F
            imm = _sext((((insn >> 5) & 0x7FFFF) << 2) | ((insn >> 29) & 3), 21)
            value = ((addr & ~0xFFF) + (imm << 12) if insn >> 31 else addr + imm) & _MASK

            def adr(r: RegAccess):
                _write_x(r, rd, value)
                r.write("pc", nxt)
            return adr
        if insn & 0x3B000000 == 0x18000000:                      # LDR (literal), integer
            rt, opc = insn & 0x1F, insn >> 30
            ea = (addr + (_sext(insn >> 5, 19) << 2)) & _MASK

            def ldr_literal(r: RegAccess):
                if opc != 3:                                     # 3 is PRFM: a hint
                    word = r.read_word(ea)
                    if opc == 0:
                        word &= 0xFFFFFFFF
                    elif opc == 2:
                        word = _sext(word, 32)
                    _write_x(r, rt, word)
                r.write("pc", nxt)
            return ldr_literal
        if insn & 0xFFFFFC1F in (0xD61F0000, 0xD63F0000, 0xD65F0000):   # BR, BLR, RET
            rn, link = (insn >> 5) & 0x1F, insn & 0xFFFFFC1F == 0xD63F0000

            def br(r: RegAccess):
                target = _read_x(r, rn)                          # before BLR x30 writes x30
                if link:
                    r.write("x30", nxt)
                r.write("pc", target)
            return br
        return None


BACKEND = Arm64()

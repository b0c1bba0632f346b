"""ARM-state (A32) encodings for the arm backend: which instructions it refuses, and the
simulations of those that read or write pc (the stepping strategy is in cpus/arm.py).

Written afresh from the ARM ARM encodings.  `_plan(w, addr)` returns a closure applying the
instruction to a `RegAccess`, None for an instruction to step out of line, or raises
`_Refuse` with an errno and a reason.
"""

from __future__ import annotations

import capstone.arm_const as ca

from ._base import EINVAL, EOPNOTSUPP, RegAccess

_MASK = 0xFFFF_FFFF
_PC_BIAS = 8          # pc reads as the instruction's address + 8 in ARM state

_GPRS = tuple(f"r{i}" for i in range(13)) + ("sp", "lr", "pc")

BKPT = 0xE1200070
COND_AL = 0xE

# CPSR condition flags.
N, Z, C, V = 1 << 31, 1 << 30, 1 << 29, 1 << 28


def _passed(cond: int, f: int) -> bool:
    """The ARM ARM's ConditionPassed() for condition `cond` and CPSR `f`."""
    n, z, c, v = bool(f & N), bool(f & Z), bool(f & C), bool(f & V)
    base = cond >> 1
    if base == 0:
        r = z
    elif base == 1:
        r = c
    elif base == 2:
        r = n
    elif base == 3:
        r = v
    elif base == 4:
        r = c and not z
    elif base == 5:
        r = n == v
    elif base == 6:
        r = n == v and not z
    else:
        return True
    return not r if cond & 1 else r


def _bits(w: int, hi: int, lo: int) -> int:
    return (w >> lo) & ((1 << (hi - lo + 1)) - 1)


def _sext(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) else value


def _ror(v: int, n: int) -> int:
    n &= 31
    return ((v >> n) | (v << (32 - n))) & _MASK if n else v


def _shift(v: int, kind: int, imm5: int, carry: bool) -> int:
    """An immediate-shifted register operand (DecodeImmShift + Shift)."""
    if kind == 0:                                   # LSL
        return (v << imm5) & _MASK
    if kind == 1:                                   # LSR #32 when imm5 == 0
        return v >> (imm5 or 32) if imm5 else 0
    if kind == 2:                                   # ASR #32 when imm5 == 0
        return (_sext(v, 32) >> (imm5 or 32)) & _MASK
    if imm5 == 0:                                   # RRX
        return (v >> 1) | (int(carry) << 31)
    return _ror(v, imm5)


class _Refuse(Exception):
    def __init__(self, errno: int, reason: str):
        self.errno, self.reason = errno, reason


# (mask, value, errno, reason) for cond != 0b1111, checked in order.
_REFUSED = (
    (0x0FF000F0, 0x01200070, EOPNOTSUPP, "bkpt is the breakpoint itself"),
    (0x0FF000F0, 0x07F000F0, EOPNOTSUPP, "permanently undefined instruction (udf/trap)"),
    (0x0F000000, 0x0F000000, EOPNOTSUPP, "supervisor call"),
    (0x0FF000F0, 0x01400070, EOPNOTSUPP, "hypervisor call"),
    (0x0FF000F0, 0x01600070, EOPNOTSUPP, "secure monitor call"),
    (0x0FFFFFFF, 0x0160006E, EOPNOTSUPP, "exception return (eret)"),
    (0x0F8000F0, 0x01800090, EOPNOTSUPP,
     "exclusive load/store: stepping it out of line would clear the exclusive monitor"),
    (0x0FFFFFFE, 0x0320F002, EOPNOTSUPP, "waits for an event or interrupt (wfe/wfi)"),
)


def _touches_pc(insn) -> bool:
    read, written = insn.regs_access()
    if ca.ARM_REG_PC in read or ca.ARM_REG_PC in written:
        return True
    for op in insn.operands:
        if op.type == ca.ARM_OP_REG and op.reg == ca.ARM_REG_PC:
            return True
        if op.type == ca.ARM_OP_MEM and ca.ARM_REG_PC in (op.mem.base, op.mem.index):
            return True
    return False


# == decoding: the returned closure simulates the instruction, None means "step it" ======
def _plan(w: int, addr: int):
    cond = w >> 28
    if cond == 0xF:
        return _plan_unconditional(w, addr)
    for mask, value, errno, reason in _REFUSED:
        if w & mask == value:
            raise _Refuse(errno, reason)
    sim = _decode(w, addr)
    if sim is None:
        return None
    if cond == COND_AL:
        return sim
    nxt = addr + 4

    def conditional(r: RegAccess):
        if _passed(cond, r.read("cpsr")):
            sim(r)
        else:
            r.write("pc", nxt)
    return conditional


def _plan_unconditional(w: int, addr: int):
    if w & 0xFE000000 == 0xFA000000:                        # BLX <imm>: to Thumb
        target = (addr + _PC_BIAS + (_sext(w & 0xFFFFFF, 24) << 2) + (_bits(w, 24, 24) << 1))
        target &= _MASK

        def blx_imm(r: RegAccess):
            r.write("lr", addr + 4)
            r.write("pc", target | 1)
        return blx_imm
    if w & 0xFD30F000 == 0xF510F000 or w & 0xFD70F000 == 0xF450F000:    # PLD/PLDW/PLI
        if _bits(w, 19, 16) == 15 and not w & (1 << 25):
            return lambda r: r.write("pc", addr + 4)        # a literal hint: nothing to do
        return None
    if w & 0xFFFFFF00 == 0xF57FF000:                        # CLREX, DSB, DMB, ISB
        return None
    if w & 0xFE000000 in (0xF2000000, 0xF4000000) and w & 0xFF100000 != 0xF4100000:
        return None                                         # Advanced SIMD: no pc operand
    raise _Refuse(EOPNOTSUPP, "system instruction (cps/setend/srs/rfe) or unallocated")


def _decode(w: int, addr: int):
    """Simulation for a conditional-space instruction that involves pc, else None."""
    op1 = _bits(w, 27, 25)
    if op1 == 0b101:                                        # B, BL
        target = (addr + _PC_BIAS + (_sext(w & 0xFFFFFF, 24) << 2)) & _MASK
        if w & (1 << 24):
            def bl(r: RegAccess):
                r.write("lr", addr + 4)
                r.write("pc", target)
            return bl
        return lambda r: r.write("pc", target)
    if w & 0x0FFFFFC0 == 0x012FFF00 and _bits(w, 5, 4) != 0:     # BX, BXJ, BLX <Rm>
        rm = w & 0xF
        link = _bits(w, 5, 4) == 0b11

        def bx(r: RegAccess):
            dest = _reg(r, rm, addr)
            if link:
                r.write("lr", addr + 4)
            r.write("pc", dest)
        return bx
    if op1 in (0b000, 0b001):
        if op1 == 0 and w & 0x90 == 0x90:
            if _bits(w, 6, 5) == 0:
                return None                                 # multiplies, swp: no pc forms
            return _extra_load_store(w, addr)
        if _bits(w, 24, 23) == 0b10 and not w & (1 << 20):
            return None                                     # misc, msr/mrs, movw/movt
        return _data_processing(w, addr)
    if op1 in (0b010, 0b011):
        if op1 == 0b011 and w & 0x10:
            return None                                     # media instructions
        return _load_store(w, addr)
    if op1 == 0b100:
        return _load_store_multiple(w, addr)
    return None                                             # coprocessor: caught by capstone


def _reg(r: RegAccess, n: int, addr: int) -> int:
    return (addr + _PC_BIAS) & _MASK if n == 15 else r.read(_GPRS[n])


_ALU = {
    0x0: lambda a, b, c: a & b,            # AND
    0x1: lambda a, b, c: a ^ b,            # EOR
    0x2: lambda a, b, c: a - b,            # SUB
    0x3: lambda a, b, c: b - a,            # RSB
    0x4: lambda a, b, c: a + b,            # ADD
    0x5: lambda a, b, c: a + b + c,        # ADC
    0x6: lambda a, b, c: a - b - (1 - c),  # SBC
    0x7: lambda a, b, c: b - a - (1 - c),  # RSC
    0xC: lambda a, b, c: a | b,            # ORR
    0xD: lambda a, b, c: b,                # MOV (and LSL/LSR/ASR/ROR/RRX by immediate)
    0xE: lambda a, b, c: a & ~b,           # BIC
    0xF: lambda a, b, c: ~b,               # MVN
}


def _data_processing(w: int, addr: int):
    imm = bool(w & (1 << 25))
    opcode, s = _bits(w, 24, 21), bool(w & (1 << 20))
    rn, rd = _bits(w, 19, 16), _bits(w, 15, 12)
    rm = w & 0xF
    uses = {rd}
    if opcode not in (0xD, 0xF):
        uses.add(rn)
    if not imm:
        uses.add(rm)
        if w & 0x10:
            uses.add(_bits(w, 11, 8))
    if 15 not in uses:
        return None
    if opcode in (0x8, 0x9, 0xA, 0xB):
        raise _Refuse(EOPNOTSUPP, "compare/test with a pc operand")
    if s:
        if rd == 15:
            raise _Refuse(EOPNOTSUPP, "exception return (flag-setting write to pc)")
        raise _Refuse(EOPNOTSUPP, "flag-setting data processing with a pc operand")
    if not imm and w & 0x10:
        raise _Refuse(EINVAL, "register-shifted register with pc is UNPREDICTABLE")
    op = _ALU[opcode]
    if imm:
        const = _ror(w & 0xFF, 2 * _bits(w, 11, 8))
        operand2 = lambda r: const                          # noqa: E731
    else:
        kind, imm5 = _bits(w, 6, 5), _bits(w, 11, 7)

        def operand2(r: RegAccess) -> int:
            carry = bool(r.read("cpsr") & C) if kind == 3 and imm5 == 0 else False
            return _shift(_reg(r, rm, addr), kind, imm5, carry)
    needs_carry = opcode in (0x5, 0x6, 0x7)

    def alu(r: RegAccess):
        c = int(bool(r.read("cpsr") & C)) if needs_carry else 0
        value = op(_reg(r, rn, addr), operand2(r), c) & _MASK
        if rd != 15:
            r.write("pc", addr + 4)
        # A write to pc interworks (ALUWritePC): bit 0 selects Thumb, as Unicorn does.
        r.write(_GPRS[rd], value)
    return alu


def _load_value(r: RegAccess, address: int, size: int, signed: bool) -> int:
    """A little-endian load of 1, 2 or 4 bytes through the word interface."""
    if size == 4:
        return r.read_word(address & _MASK)
    base = address & ~3 & _MASK
    lane = address & 3
    if lane + size > 4:                       # an unaligned halfword across words
        lo = r.read_word(base)
        hi = r.read_word(base + 4)
        v = ((hi << 32 | lo) >> (8 * lane)) & ((1 << (8 * size)) - 1)
    else:
        v = (r.read_word(base) >> (8 * lane)) & ((1 << (8 * size)) - 1)
    return _sext(v, 8 * size) & _MASK if signed else v


def _store_value(r: RegAccess, address: int, size: int, value: int) -> None:
    if size == 4:
        r.write_word(address & _MASK, value)
        return
    base = address & ~3 & _MASK
    lane = address & 3
    mask = ((1 << (8 * size)) - 1) << (8 * lane)
    old = r.read_word(base)
    r.write_word(base, (old & ~mask) | ((value << (8 * lane)) & mask))


def _addressing(w: int, rn: int, offset, addr: int):
    """P/U/W addressing: (address, writeback value or None) for a given RegAccess."""
    p, u, wb = bool(w & (1 << 24)), bool(w & (1 << 23)), bool(w & (1 << 21))

    def compute(r: RegAccess):
        base = _reg(r, rn, addr)
        off = offset(r)
        offset_addr = (base + off if u else base - off) & _MASK
        address = offset_addr if p else base
        return address, (offset_addr if (wb or not p) else None)
    return compute


def _load_store(w: int, addr: int):
    """LDR, LDRB, STR, STRB (immediate, register)."""
    reg_off = bool(w & (1 << 25))
    p, wb = bool(w & (1 << 24)), bool(w & (1 << 21))
    byte, load = bool(w & (1 << 22)), bool(w & (1 << 20))
    rn, rt, rm = _bits(w, 19, 16), _bits(w, 15, 12), w & 0xF
    if 15 not in (rn, rt) and not (reg_off and rm == 15):
        return None
    if not p and wb:
        raise _Refuse(EOPNOTSUPP, "unprivileged load/store (ldrt/strt) with pc")
    writeback = wb or not p
    if reg_off and rm == 15:
        raise _Refuse(EINVAL, "pc as the offset register is UNPREDICTABLE")
    if writeback and (rn == 15 or rn == rt):
        raise _Refuse(EINVAL, "writeback with pc or the transfer register as base is "
                              "UNPREDICTABLE")
    if byte and rt == 15:
        raise _Refuse(EINVAL, "byte transfer of pc is UNPREDICTABLE")
    if reg_off:
        kind, imm5 = _bits(w, 6, 5), _bits(w, 11, 7)

        def offset(r: RegAccess) -> int:
            return _shift(r.read(_GPRS[rm]), kind, imm5, bool(r.read("cpsr") & C))
    else:
        imm12 = w & 0xFFF
        offset = lambda r: imm12                            # noqa: E731
    where = _addressing(w, rn, offset, addr)
    size = 1 if byte else 4

    def transfer(r: RegAccess):
        address, new_base = where(r)
        if load:
            value = _load_value(r, address, size, False)
        else:
            _store_value(r, address, size, _reg(r, rt, addr))
        if new_base is not None:
            r.write(_GPRS[rn], new_base)
        if not load or rt != 15:
            r.write("pc", addr + 4)
        if load:
            r.write(_GPRS[rt], value)       # into pc: LoadWritePC interworks
    return transfer


def _extra_load_store(w: int, addr: int):
    """LDRH, LDRSB, LDRSH, LDRD, STRH, STRD (immediate, register)."""
    imm_form, load = bool(w & (1 << 22)), bool(w & (1 << 20))
    p, wb = bool(w & (1 << 24)), bool(w & (1 << 21))
    rn, rt, rm = _bits(w, 19, 16), _bits(w, 15, 12), w & 0xF
    op2 = _bits(w, 6, 5)
    double = not load and op2 in (0b10, 0b11)
    regs_moved = (rt, rt + 1) if double else (rt,)
    if 15 not in (rn, *regs_moved) and not (not imm_form and rm == 15):
        return None
    if 15 in regs_moved or (not imm_form and rm == 15):
        raise _Refuse(EINVAL, "pc as a transfer or offset register is UNPREDICTABLE")
    if not p and wb:
        raise _Refuse(EOPNOTSUPP, "unprivileged load/store (ldrht/strht...) with pc")
    if wb or not p:
        raise _Refuse(EINVAL, "writeback with pc as base is UNPREDICTABLE")
    if not load and not double or op2 == 0b11 and double:
        raise _Refuse(EOPNOTSUPP, "store relative to pc")
    if double and rt & 1:
        raise _Refuse(EINVAL, "ldrd with an odd first register is UNPREDICTABLE")
    if imm_form:
        imm8 = (_bits(w, 11, 8) << 4) | (w & 0xF)
        offset = lambda r: imm8                             # noqa: E731
    else:
        offset = lambda r: r.read(_GPRS[rm])                # noqa: E731
    where = _addressing(w, rn, offset, addr)
    if double:                                              # LDRD (literal)
        def ldrd(r: RegAccess):
            address, _ = where(r)
            lo, hi = r.read_word(address), r.read_word((address + 4) & _MASK)
            r.write("pc", addr + 4)
            r.write(_GPRS[rt], lo)
            r.write(_GPRS[rt + 1], hi)
        return ldrd
    size, signed = {0b01: (2, False), 0b10: (1, True), 0b11: (2, True)}[op2]

    def ldrx(r: RegAccess):
        address, _ = where(r)
        value = _load_value(r, address, size, signed)
        r.write("pc", addr + 4)
        r.write(_GPRS[rt], value)
    return ldrx


def _load_store_multiple(w: int, addr: int):
    """LDM into pc (pop {..., pc}) and STM of pc, in all four addressing modes."""
    p, u, user, wb, load = (bool(w & (1 << b)) for b in (24, 23, 22, 21, 20))
    rn, reglist = _bits(w, 19, 16), w & 0xFFFF
    if not reglist & 0x8000 and rn != 15:
        return None
    if rn == 15:
        raise _Refuse(EINVAL, "pc as the base of ldm/stm is UNPREDICTABLE")
    if user:
        raise _Refuse(EOPNOTSUPP, "exception return or user-bank transfer (ldm/stm ^)")
    if load and wb and reglist & (1 << rn):
        raise _Refuse(EINVAL, "ldm with writeback and the base in the list is UNPREDICTABLE")
    regs = [i for i in range(16) if reglist & (1 << i)]
    n = len(regs)

    def multiple(r: RegAccess):
        base = r.read(_GPRS[rn])
        if u:
            start = base + 4 if p else base
            new_base = base + 4 * n
        else:
            start = base - 4 * n if p else base - 4 * n + 4
            new_base = base - 4 * n
        start &= _MASK
        values = []
        for i, reg in enumerate(regs):
            a = (start + 4 * i) & _MASK
            if load:
                values.append((reg, r.read_word(a)))
            else:
                r.write_word(a, _reg(r, reg, addr))
        if wb:
            r.write(_GPRS[rn], new_base & _MASK)
        if not (load and reglist & 0x8000):
            r.write("pc", addr + 4)
        for reg, value in values:
            r.write(_GPRS[reg], value)      # pc last: LoadWritePC interworks
    return multiple

"""What x86_64 and i386 share: int3 breakpoints, and how a probed x86 instruction is stepped.

The two widths differ only in facts (word size, register names, where arguments live), so the
stepping logic below is written once and reads every width-dependent detail from the backend:
the word mask from `bits`, the program counter, stack pointer and flags from the calling
convention, the count register from `counter_reg`.

Stepping strategy, following arch/x86/kernel/kprobes (written afresh):
  * ordinary instructions are copied into a slot; a RIP-relative displacement (64-bit mode
    only: 32-bit mode has no PC-relative data addressing) is rewritten so the copy reaches the
    same target; the copy is followed by an int3 that ends the step, or, when boosted, by a
    `jmp rel32` back to the next instruction;
  * control transfers (call, jmp, Jcc, ret, loop/jcxz, indirect call/jmp) are simulated: their
    effect on the PC and SP is computed from the registers, which is what the kernel's
    resume_execution fixups achieve after a TF single-step;
  * int3, int n, iret, far transfers, syscall/sysenter, hlt and ud2 are refused
    (EOPNOTSUPP), as are branches with an operand-size prefix (they truncate the PC).
"""

from __future__ import annotations

import capstone.x86_const as cx

from ._base import (EOPNOTSUPP, CpuBackend, InsnPlan, RegAccess, Register, StepKind,
                    UnsteppableError)

BREAKPOINT = b"\xcc"          # int3
JMP_REL32 = b"\xe9"
MAX_INSN_LEN = 15
SLOT_SIZE = 48                # two halves of 24: copy + int3, copy + jmp rel32
PAGE_FAULT_TRAPNR = 14        # X86_TRAP_PF, what do_page_fault hands kprobe_page_fault


def register_file(prefix: str, size: int, arg_regs: tuple[str, ...],
                  extra: tuple[Register, ...]) -> tuple[Register, ...]:
    """The eight legacy registers of one width (`prefix` "r" or "e"), each with the
    kernel's width-neutral pt_regs name as its alias (`ax` for rax/eax), then `extra`."""
    legacy = tuple(Register(prefix + k, size, (k,), general_purpose=True,
                            argument=prefix + k in arg_regs)
                   for k in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp"))
    return legacy + extra


# EFLAGS bits used by Jcc and loopcc simulation.
CF, PF, ZF, SF, OF = 1 << 0, 1 << 2, 1 << 6, 1 << 7, 1 << 11

_CONDITIONS = {
    "jo": lambda f: bool(f & OF), "jno": lambda f: not f & OF,
    "jb": lambda f: bool(f & CF), "jae": lambda f: not f & CF,
    "je": lambda f: bool(f & ZF), "jne": lambda f: not f & ZF,
    "jbe": lambda f: bool(f & (CF | ZF)), "ja": lambda f: not f & (CF | ZF),
    "js": lambda f: bool(f & SF), "jns": lambda f: not f & SF,
    "jp": lambda f: bool(f & PF), "jnp": lambda f: not f & PF,
    "jl": lambda f: bool(f & SF) != bool(f & OF), "jge": lambda f: bool(f & SF) == bool(f & OF),
    "jle": lambda f: bool(f & ZF) or bool(f & SF) != bool(f & OF),
    "jg": lambda f: not f & ZF and bool(f & SF) == bool(f & OF),
}

# jcxz-style branches: which width of the count register they test.
_COUNT_ZERO = {"jrcxz": 64, "jecxz": 32, "jcxz": 16}
_LOOPS = ("loop", "loope", "loopne")

_REFUSED = {
    "int3": "int3 is the breakpoint itself",
    "int": "software interrupt", "int1": "icebp", "into": "software interrupt",
    "iret": "interrupt return", "iretd": "interrupt return", "iretq": "interrupt return",
    "syscall": "system call entry", "sysret": "system call return",
    "sysenter": "system call entry", "sysexit": "system call return",
    "hlt": "halts the CPU", "ud2": "undefined instruction", "ud0": "undefined instruction",
    "ud1": "undefined instruction",
    "ljmp": "far jump", "lcall": "far call", "retf": "far return", "retfq": "far return",
}

_OPSIZE_PREFIX = 0x66


class X86Backend(CpuBackend):
    """An x86 backend of either width.  Subclasses pass the facts; `counter_reg` is the
    full-width count register that loop and jcxz use."""

    counter_reg: str = "rcx"

    # -- stepping -------------------------------------------------------------------------
    def plan_insn(self, code: bytes, addr: int) -> InsnPlan:
        insn = next(self.disassembler().disasm(code, addr, 1), None)
        if insn is None:
            raise UnsteppableError(EOPNOTSUPP, "cannot decode instruction")
        mnem = insn.mnemonic
        orig = bytes(insn.bytes)
        base = dict(addr=addr, length=insn.size, orig=orig, mnemonic=f"{mnem} {insn.op_str}".strip())
        if mnem.startswith("rep ") or mnem.startswith("lock "):
            mnem_core = mnem.split()[-1]
        else:
            mnem_core = mnem
        if mnem_core in _REFUSED:
            raise UnsteppableError(EOPNOTSUPP, f"{mnem_core}: {_REFUSED[mnem_core]}")
        sim = self._simulation(insn, mnem_core)
        if sim is not None:
            return InsnPlan(kind=StepKind.SIMULATE, simulate=sim, **base)
        rip_disp = None
        if insn.disp_size and any(op.type == cx.X86_OP_MEM and op.mem.base == cx.X86_REG_RIP
                                  for op in insn.operands):
            rip_disp = (insn.disp_offset, insn.disp_size, insn.disp)
        return InsnPlan(kind=StepKind.OUT_OF_LINE, boostable=True, fixup=rip_disp, **base)

    def slot_code(self, plan: InsnPlan, slot_addr: int, boost: bool) -> bytes:
        """The copied instruction, fixed up for `slot_addr`, and its tail."""
        code = bytearray(plan.orig)
        if plan.fixup is not None:
            off, size, disp = plan.fixup
            new = disp + plan.addr - slot_addr
            if not -(1 << 31) <= new < (1 << 31):
                raise UnsteppableError(EOPNOTSUPP, "RIP-relative target out of reach of the slot")
            code[off:off + size] = new.to_bytes(size, "little", signed=True)
        end = slot_addr + len(code)
        if boost:
            rel = plan.addr + plan.length - (end + len(JMP_REL32) + 4)
            code += JMP_REL32 + rel.to_bytes(4, "little", signed=True)
        else:
            code += self.breakpoint
        return bytes(code)

    def _simulation(self, insn, mnem):
        is_ret = mnem in ("ret", "retq", "retd")
        if not (is_ret or mnem in ("call", "jmp") or mnem in _CONDITIONS
                or mnem in _COUNT_ZERO or mnem in _LOOPS):
            return None
        if _OPSIZE_PREFIX in insn.prefix:
            raise UnsteppableError(EOPNOTSUPP, f"{mnem} with an operand-size prefix truncates "
                                               f"the instruction pointer")
        mask = self.word_mask
        w = self.word_bytes
        pc, sp, flags = self.cc.pc_reg, self.cc.sp_reg, self.flags_reg
        nxt = insn.address + insn.size
        ops = insn.operands
        if is_ret:
            pop = ops[0].imm if ops else 0

            def ret(r: RegAccess):
                top = r.read(sp)
                r.write(pc, r.read_word(top))
                r.write(sp, (top + w + pop) & mask)
            return ret
        target = self._target(insn)
        if mnem == "call":
            def call(r: RegAccess):
                dest = target(r)
                top = (r.read(sp) - w) & mask
                r.write_word(top, nxt)
                r.write(sp, top)
                r.write(pc, dest)
            return call
        if mnem == "jmp":
            return lambda r: r.write(pc, target(r))
        if mnem in _CONDITIONS:
            cond = _CONDITIONS[mnem]
            return lambda r: r.write(pc, target(r) if cond(r.read(flags)) else nxt)
        count = self.counter_reg
        if mnem in _COUNT_ZERO:
            width = (1 << _COUNT_ZERO[mnem]) - 1
            return lambda r: r.write(pc, target(r) if r.read(count) & width == 0 else nxt)
        # loop/loope/loopne count in the address-size width of the count register; a write
        # of 32 bits or more replaces the register (zero-extending), a 16-bit one merges.
        bits = insn.addr_size * 8
        width = (1 << bits) - 1

        def loop(r: RegAccess):
            old = r.read(count)
            n = (old - 1) & width
            r.write(count, n if bits >= 32 else (old & ~width) | n)
            zf = bool(r.read(flags) & ZF)
            taken = n != 0 and (mnem == "loop" or (mnem == "loope") == zf)
            r.write(pc, target(r) if taken else nxt)
        return loop

    def _target(self, insn):
        op = insn.operands[0]
        nxt = insn.address + insn.size
        mask = self.word_mask
        if op.type == cx.X86_OP_IMM:
            imm = op.imm & mask
            return lambda r: imm
        if op.type == cx.X86_OP_REG:
            name = insn.reg_name(op.reg)
            self._check_reg(name, insn)
            return lambda r: r.read(name)
        if insn.opcode[0] == 0xFF and (insn.modrm >> 3) & 7 in (3, 5):
            raise UnsteppableError(EOPNOTSUPP, f"far {insn.mnemonic} through memory")
        mem = op.mem
        if mem.segment != cx.X86_REG_INVALID:
            raise UnsteppableError(EOPNOTSUPP, "segment-relative indirect branch")
        pc = self.cc.pc_reg
        base = None if mem.base == cx.X86_REG_INVALID else insn.reg_name(mem.base)
        index = None if mem.index == cx.X86_REG_INVALID else insn.reg_name(mem.index)
        for name in (base, index):
            if name is not None and name != pc:
                self._check_reg(name, insn)
        scale, disp = mem.scale, mem.disp

        def indirect(r: RegAccess):
            ea = disp
            if base == pc:
                ea += nxt
            elif base is not None:
                ea += r.read(base)
            if index is not None:
                ea += r.read(index) * scale
            return r.read_word(ea & mask)
        return indirect

    def _check_reg(self, name: str, insn) -> None:
        if name not in self.registers:
            raise UnsteppableError(EOPNOTSUPP, f"{insn.mnemonic} {insn.op_str}: {name} is not a "
                                               f"full-width register of {self.name}")

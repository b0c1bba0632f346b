"""x86_64: int3 breakpoints, the SysV calling convention, RIP-relative fixups.

Stepping strategy, following arch/x86/kernel/kprobes (written afresh):
  * ordinary instructions are copied into a slot; a RIP-relative displacement is rewritten so
    the copy reaches the same target; the copy is followed by an int3 that ends the step, or,
    when boosted, by a `jmp rel32` back to the next instruction;
  * control transfers (call, jmp, Jcc, ret, loop/jrcxz, indirect call/jmp) are simulated: their
    effect on RIP/RSP is computed from the registers, which is what the kernel's
    resume_execution fixups achieve after a TF single-step;
  * int3, int n, iret, far transfers, syscall/sysret, hlt and ud2 are refused (EOPNOTSUPP).
"""

from __future__ import annotations

import capstone
import capstone.x86_const as cx
import unicorn
import unicorn.x86_const as ux

from ._base import (EOPNOTSUPP, CallingConvention, CpuBackend, InsnPlan, RegAccess, StepKind,
                    UnsteppableError)

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

REGISTERS = {name: getattr(ux, "UC_X86_REG_" + name.upper()) for name in _GPRS}
REGISTERS.update(rip=ux.UC_X86_REG_RIP, rflags=ux.UC_X86_REG_RFLAGS,
                 fs_base=ux.UC_X86_REG_FS_BASE, gs_base=ux.UC_X86_REG_GS_BASE)

# EFLAGS bits used by Jcc simulation.
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

_MASK = (1 << 64) - 1


class X86_64(CpuBackend):
    def __init__(self):
        super().__init__(
            name="x86_64", bits=64, endian="little",
            uc_arch=unicorn.UC_ARCH_X86, uc_mode=unicorn.UC_MODE_64,
            cs_arch=capstone.CS_ARCH_X86, cs_mode=capstone.CS_MODE_64,
            breakpoint=b"\xcc", trap_intno=3, trap_pc_offset=1,
            registers=REGISTERS,
            cc=CallingConvention(word_bytes=8, arg_regs=("rdi", "rsi", "rdx", "rcx", "r8", "r9"),
                                 ret_reg="rax", sp_reg="rsp", pc_reg="rip",
                                 return_address_reg=None, stack_args_offset=8, stack_align=16),
            flags_reg="rflags", fp_reg="rbp", max_insn_len=15, slot_size=48,
            frame_saved_fp_offset=0, frame_ret_offset=8,
            kretprobe_blacklist=("__switch_to",),
        )

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
            rel = plan.addr + plan.length - (end + 5)
            code += b"\xe9" + rel.to_bytes(4, "little", signed=True)
        else:
            code += self.breakpoint
        return bytes(code)

    def _simulation(self, insn, mnem):
        nxt = insn.address + insn.size
        ops = insn.operands
        if mnem in ("ret", "retq"):
            pop = ops[0].imm if ops else 0

            def ret(r: RegAccess):
                sp = r.read("rsp")
                r.write("rip", r.read_word(sp))
                r.write("rsp", (sp + 8 + pop) & _MASK)
            return ret
        if mnem in ("call", "jmp") or mnem in _CONDITIONS or mnem in ("loop", "loope", "loopne",
                                                                         "jrcxz", "jecxz"):
            target = self._target(insn)
            if mnem == "call":
                def call(r: RegAccess):
                    dest = target(r)
                    sp = (r.read("rsp") - 8) & _MASK
                    r.write_word(sp, nxt)
                    r.write("rsp", sp)
                    r.write("rip", dest)
                return call
            if mnem == "jmp":
                return lambda r: r.write("rip", target(r))
            if mnem in _CONDITIONS:
                cond = _CONDITIONS[mnem]
                return lambda r: r.write("rip", target(r) if cond(r.read("rflags")) else nxt)
            if mnem in ("jrcxz", "jecxz"):
                width = _MASK if mnem == "jrcxz" else 0xFFFFFFFF
                return lambda r: r.write("rip", target(r) if r.read("rcx") & width == 0 else nxt)

            def loop(r: RegAccess):
                rcx = (r.read("rcx") - 1) & _MASK
                r.write("rcx", rcx)
                zf = bool(r.read("rflags") & ZF)
                taken = rcx != 0 and (mnem == "loop" or (mnem == "loope") == zf)
                r.write("rip", target(r) if taken else nxt)
            return loop
        return None

    def _target(self, insn):
        op = insn.operands[0]
        nxt = insn.address + insn.size
        if op.type == cx.X86_OP_IMM:
            imm = op.imm & _MASK
            return lambda r: imm
        if op.type == cx.X86_OP_REG:
            name = insn.reg_name(op.reg)
            return lambda r: r.read(name)
        mem = op.mem
        if mem.segment != cx.X86_REG_INVALID:
            raise UnsteppableError(EOPNOTSUPP, "segment-relative indirect branch")
        base = None if mem.base == cx.X86_REG_INVALID else insn.reg_name(mem.base)
        index = None if mem.index == cx.X86_REG_INVALID else insn.reg_name(mem.index)
        scale, disp = mem.scale, mem.disp

        def indirect(r: RegAccess):
            ea = disp
            if base == "rip":
                ea += nxt
            elif base is not None:
                ea += r.read(base)
            if index is not None:
                ea += r.read(index) * scale
            return r.read_word(ea & _MASK)
        return indirect


BACKEND = X86_64()

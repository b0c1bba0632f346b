"""x86_64: int3 breakpoints, the SysV calling convention, RIP-relative fixups.

The stepping logic (copy out of line with a RIP-relative fixup, simulate control transfers,
refuse int3/iret/far transfers...) is shared with i386 and lives in `_x86`; this module
declares the 64-bit facts.
"""

from __future__ import annotations

import capstone
import unicorn

from . import _x86
from ._base import CallingConvention

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

REGISTERS = _x86.registers(_GPRS, "rip", "rflags", "fs_base", "gs_base")


class X86_64(_x86.X86Backend):
    counter_reg = "rcx"

    def __init__(self):
        super().__init__(
            name="x86_64", bits=64, endian="little",
            uc_arch=unicorn.UC_ARCH_X86, uc_mode=unicorn.UC_MODE_64,
            cs_arch=capstone.CS_ARCH_X86, cs_mode=capstone.CS_MODE_64,
            breakpoint=_x86.BREAKPOINT, trap_intno=_x86.TRAP_INTNO,
            trap_pc_offset=_x86.TRAP_PC_OFFSET,
            registers=REGISTERS,
            cc=CallingConvention(word_bytes=8, arg_regs=("rdi", "rsi", "rdx", "rcx", "r8", "r9"),
                                 ret_reg="rax", sp_reg="rsp", pc_reg="rip",
                                 return_address_reg=None, stack_args_offset=8, stack_align=16),
            flags_reg="rflags", fp_reg="rbp", max_insn_len=_x86.MAX_INSN_LEN,
            slot_size=_x86.SLOT_SIZE,
            frame_saved_fp_offset=0, frame_ret_offset=8,
            kretprobe_blacklist=("__switch_to",),
        )


BACKEND = X86_64()

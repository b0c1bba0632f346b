"""x86_64: int3 breakpoints, the SysV calling convention, RIP-relative fixups.

The stepping logic (copy out of line with a RIP-relative fixup, simulate control transfers,
refuse int3/iret/far transfers...) is shared with i386 and lives in `_x86`; this module
declares the 64-bit facts.

Register names: the regs view spells them as the ISA does (rax, rip); a kprobe_events
fetch-arg also takes the kernel's pt_regs names (arch/x86/kernel/ptrace.c regoffset_table:
ax..sp, r8..r15, ip, flags).  The kernel's orig_ax, cs and ss are not modelled.
"""

from __future__ import annotations

import capstone

from . import _unicorn, _x86
from ._base import CallingConvention, Register

ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")

REGISTERS = _x86.register_file("r", 8, ARG_REGS, (
    *(Register(f"r{n}", 8, general_purpose=True, argument=f"r{n}" in ARG_REGS)
      for n in range(8, 16)),
    Register("rip", 8, ("ip",)),
    Register("rflags", 8, ("flags",)),
    Register("fs_base", 8),
    Register("gs_base", 8),
))


class X86_64(_x86.X86Backend):
    counter_reg = "rcx"

    def __init__(self):
        super().__init__(
            name="x86_64", bits=64, endian="little",
            cs_arch=capstone.CS_ARCH_X86, cs_mode=capstone.CS_MODE_64,
            breakpoint=_x86.BREAKPOINT,
            register_file=REGISTERS,
            cc=CallingConvention(word_bytes=8, arg_regs=ARG_REGS,
                                 ret_reg="rax", sp_reg="rsp", pc_reg="rip",
                                 return_address_reg=None, stack_args_offset=8, stack_align=16,
                                 # SysV: the six integer argument registers.
                                 default_arg_count=6),
            flags_reg="rflags", fp_reg="rbp", max_insn_len=_x86.MAX_INSN_LEN,
            slot_size=_x86.SLOT_SIZE,
            unicorn=_unicorn.X86_64,
            page_fault_trapnr=_x86.PAGE_FAULT_TRAPNR,
            frame_saved_fp_offset=0, frame_ret_offset=8,
            kretprobe_blacklist=("__switch_to",),
        )


BACKEND = X86_64()

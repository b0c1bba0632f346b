"""i386: int3 breakpoints and cdecl, where every argument is on the stack.

The stepping logic is x86_64's (shared in `_x86`).  What differs is data: 32-bit words,
the e-registers, and a calling convention with no argument registers: at function entry
[esp] is the return address and [esp + 4] the first argument.  32-bit mode has no
RIP-relative addressing, so a copied instruction never needs a displacement fixup; absolute
addresses stay valid in the slot.

Register names: eax..esp, eip, eflags, and the kernel's pt_regs names for them (ax..sp,
ip, flags).  The kernel's segment registers and orig_ax are not modelled.
"""

from __future__ import annotations

import capstone

from . import _unicorn, _x86
from ._base import CallingConvention, Register

REGISTERS = _x86.register_file("e", 4, (), (
    Register("eip", 4, ("ip",)),
    Register("eflags", 4, ("flags",)),
))


class I386(_x86.X86Backend):
    counter_reg = "ecx"

    def __init__(self):
        super().__init__(
            name="i386", bits=32, endian="little",
            cs_arch=capstone.CS_ARCH_X86, cs_mode=capstone.CS_MODE_32,
            breakpoint=_x86.BREAKPOINT,
            register_file=REGISTERS,
            cc=CallingConvention(word_bytes=4, arg_regs=(), ret_reg="eax", sp_reg="esp",
                                 pc_reg="eip", return_address_reg=None, stack_args_offset=4,
                                 stack_align=16,
                                 # cdecl: no argument registers; six stack words.
                                 default_arg_count=6),
            flags_reg="eflags", fp_reg="ebp", max_insn_len=_x86.MAX_INSN_LEN,
            slot_size=_x86.SLOT_SIZE,
            unicorn=_unicorn.I386,
            page_fault_trapnr=_x86.PAGE_FAULT_TRAPNR,
            # push ebp; mov ebp, esp: [ebp] = the caller's ebp, [ebp + 4] = return address.
            frame_saved_fp_offset=0, frame_ret_offset=4,
            kretprobe_blacklist=("__switch_to",),
        )


BACKEND = I386()

"""i386: int3 breakpoints and cdecl, where every argument is on the stack.

The stepping logic is x86_64's (shared in `_x86`).  What differs is data: 32-bit words,
the e-registers, and a calling convention with no argument registers: at function entry
[esp] is the return address and [esp + 4] the first argument.  32-bit mode has no
RIP-relative addressing, so a copied instruction never needs a displacement fixup; absolute
addresses stay valid in the slot.
"""

from __future__ import annotations

import capstone
import unicorn

from . import _x86
from ._base import CallingConvention

_GPRS = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp")

REGISTERS = _x86.registers(_GPRS, "eip", "eflags")


class I386(_x86.X86Backend):
    counter_reg = "ecx"

    def __init__(self):
        super().__init__(
            name="i386", bits=32, endian="little",
            uc_arch=unicorn.UC_ARCH_X86, uc_mode=unicorn.UC_MODE_32,
            cs_arch=capstone.CS_ARCH_X86, cs_mode=capstone.CS_MODE_32,
            breakpoint=_x86.BREAKPOINT, trap_intno=_x86.TRAP_INTNO,
            trap_pc_offset=_x86.TRAP_PC_OFFSET,
            registers=REGISTERS,
            cc=CallingConvention(word_bytes=4, arg_regs=(), ret_reg="eax", sp_reg="esp",
                                 pc_reg="eip", return_address_reg=None, stack_args_offset=4,
                                 stack_align=16),
            flags_reg="eflags", fp_reg="ebp", max_insn_len=_x86.MAX_INSN_LEN,
            slot_size=_x86.SLOT_SIZE,
            # push ebp; mov ebp, esp: [ebp] = the caller's ebp, [ebp + 4] = return address.
            frame_saved_fp_offset=0, frame_ret_offset=4,
            kretprobe_blacklist=("__switch_to",),
        )


BACKEND = I386()

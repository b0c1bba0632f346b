"""The emulator's side of each backend: what Unicorn 2.1.4 does, not what the ISA says.

A `CpuBackend` declares an instruction set (cpus/_base.py); the machine runs it on Unicorn,
and everything that is Unicorn's rather than the architecture's lives here, in one
`UnicornQuirks` object per backend (`backend.unicorn`):

  * how to make an engine (`uc_arch`, `uc_mode`, a CPU model to pin);
  * Unicorn's register ids for the register file's names (`reg_id`);
  * how Unicorn reports the kprobes breakpoint: its interrupt number (QEMU's exception
    number, not the kernel's trap number) and where the PC points in the hook;
  * the workarounds for what Unicorn lacks, as hooks with do-nothing defaults: context
    save/restore (`context_save`), registers its API does not reach (`read_special`), a
    resume point other than the PC (`emu_start_address`), traps real firmware would handle
    (`handle_firmware_trap`).  Only sparc64 overrides them (cpus/_unicorn_sparc64.py).

The facts below were measured on Unicorn 2.1.4.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Mapping

import unicorn
import unicorn.arm64_const as ua64
import unicorn.arm_const as ua
import unicorn.ppc_const as up
import unicorn.x86_const as ux


@dataclass(frozen=True)
class UnicornQuirks:
    """One architecture on Unicorn: engine, register ids, breakpoint report, workarounds."""

    uc_arch: int
    uc_mode: int
    # Register ids are `consts.<reg_prefix><NAME>`, NAME the record's name upper-cased or
    # as `reg_spelling` spells it (ppc: r3 is UC_PPC_REG_3).
    consts: ModuleType
    reg_prefix: str
    # The interrupt number Unicorn reports for the kprobes breakpoint, and where the PC
    # points in the interrupt hook, relative to the breakpoint's address.
    trap_intno: int
    trap_pc_offset: int
    reg_spelling: Mapping[str, str] = field(default_factory=dict)
    # Registers Unicorn's register API does not reach, served by `read_special` and
    # `write_special` under these (negative) ids.
    special_regs: Mapping[str, int] = field(default_factory=dict)
    # A CPU model to pin with ctl_set_cpu_model, or None for Unicorn's default.
    cpu_model: int | None = None
    # The `until` address every `emu_start` is given.  The machine never stops a CPU there
    # (quanta end through block hooks, nested calls through the __hc_call_return hook), so
    # it must be an address no guest jump can make Unicorn mishandle.  0 on most arches, where
    # a jump to 0 stops as at `until` and the next quantum finds the PC unmapped.
    emu_until: int = 0

    def reg_id(self, name: str) -> int:
        if name in self.special_regs:
            return self.special_regs[name]
        return getattr(self.consts, self.reg_prefix + self.reg_spelling.get(name, name).upper())

    # -- the hooks the machine calls --------------------------------------------------------
    def setup(self, uc) -> None:
        """Arch-specific Unicorn setup after the instance is created."""
        if self.cpu_model is not None:
            uc.ctl_set_cpu_model(self.cpu_model)

    def context_save(self, uc):
        """The CPU state a task switch saves (Unicorn's context, where it is complete)."""
        return uc.context_save()

    def context_restore(self, uc, ctx) -> None:
        uc.context_restore(ctx)

    def emu_start_address(self, uc, pc: int) -> int:
        """Where `emu_start` must begin to resume a CPU stopped at `pc`.  `emu_start` sets
        only the PC, which is all the state there is unless the ISA has hidden sequencing
        state a stop can leave pending (sparc64's nPC)."""
        return pc

    def read_special(self, uc, rid: int) -> int:
        """A register listed in `special_regs`: none by default."""
        raise KeyError(rid)

    def write_special(self, uc, rid: int, value: int) -> None:
        raise KeyError(rid)

    def handle_firmware_trap(self, cpu, intno: int) -> bool:
        """A trap that firmware handles on real hardware, invisible to the kernel, and that
        Unicorn leaves to its interrupt hook (sparc64: register-window spill and fill).
        Return True when handled; the CPU then goes on.  The default handles none."""
        return False


# int3 raises #BP (3) as a trap: the PC is already past it.
X86_64 = UnicornQuirks(uc_arch=unicorn.UC_ARCH_X86, uc_mode=unicorn.UC_MODE_64,
                       consts=ux, reg_prefix="UC_X86_REG_", trap_intno=3, trap_pc_offset=1)

I386 = UnicornQuirks(uc_arch=unicorn.UC_ARCH_X86, uc_mode=unicorn.UC_MODE_32,
                     consts=ux, reg_prefix="UC_X86_REG_", trap_intno=3, trap_pc_offset=1)

# Every BRK raises interrupt 7 (QEMU's EXCP_BKPT) with the PC still at the BRK.
ARM64 = UnicornQuirks(uc_arch=unicorn.UC_ARCH_ARM64, uc_mode=unicorn.UC_MODE_ARM,
                      consts=ua64, reg_prefix="UC_ARM64_REG_", trap_intno=7, trap_pc_offset=0)

# `tw 31,0,0` raises interrupt 6 with the PC already *past* the trap (trap + 4); `sc` raises 8
# and an illegal instruction 96, each with the PC past the instruction.  The CPU is a
# PowerPC 750 (G3) instead of Unicorn's default 7457A: the 7457A has a software TLB that
# Unicorn allocates on the heap and keeps a pointer to *inside* the CPU state that
# `uc_context_save` copies, so restoring a task's context on another CPU (a migration) made
# two engines share, and both free, one TLB (glibc: "double free or corruption" at exit;
# valgrind: the 3,072-byte block of cpu_ppc_init_ppc freed twice by ppc_release).  The 750's
# hash MMU has no such array; in real mode (MSR[IR] = MSR[DR] = 0, Unicorn's reset state) the
# two run the kernel identically.
PPC = UnicornQuirks(uc_arch=unicorn.UC_ARCH_PPC,
                    uc_mode=unicorn.UC_MODE_PPC32 | unicorn.UC_MODE_BIG_ENDIAN,
                    consts=up, reg_prefix="UC_PPC_REG_", trap_intno=6, trap_pc_offset=4,
                    reg_spelling={f"r{i}": str(i) for i in range(32)},
                    cpu_model=up.UC_CPU_PPC32_750_V3_1)

# BKPT raises interrupt 7 with the PC still at the BKPT.  Unicorn ends emulation with
# UC_ERR_INSN_INVALID on any undefined instruction (Linux's ARM kprobes breakpoint is one)
# instead of raising a hookable interrupt, which is why the arm backend uses BKPT.  The
# kernel is built for the Cortex-A15 (udiv/sdiv); Unicorn is pinned to the same core.
ARM = UnicornQuirks(uc_arch=unicorn.UC_ARCH_ARM, uc_mode=unicorn.UC_MODE_ARM,
                    consts=ua, reg_prefix="UC_ARM_REG_", trap_intno=7, trap_pc_offset=0,
                    cpu_model=ua.UC_CPU_ARM_CORTEX_A15)

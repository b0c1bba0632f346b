"""Hardware breakpoints (debug registers) per architecture, as data: how many slots, which
types, which lengths and alignments, and when the handler runs relative to the access.

From each arch's `hw_breakpoint.c` in Linux:
  * x86 (arch/x86/kernel/hw_breakpoint.c): four debug registers DR0-DR3 shared by data and
    instruction breakpoints; lengths 1, 2, 4 (and 8 on x86_64), the address aligned to the
    length; no read-only type (DR7 has write and read/write only); an instruction breakpoint
    has length sizeof(long).  A data breakpoint is a trap: the handler runs after the access,
    so it sees the new value.
  * arm64 (arch/arm64/kernel/hw_breakpoint.c): separate breakpoint (BRP) and watchpoint (WRP)
    registers, 6 and 4 on a Cortex-A57/A72; load, store or both; a watchpoint covers bytes of
    one aligned doubleword.  It faults before the access: the kernel runs the handler, steps
    over the access with the watchpoint disabled, and re-arms it.
  * arm (arch/arm/kernel/hw_breakpoint.c): as arm64 with v7 debug (Cortex-A15: 6 BRPs,
    4 WRPs), a watchpoint inside one aligned word.
  * ppc (arch/powerpc/kernel/hw_breakpoint.c): one DABR, data only, inside one aligned
    doubleword.  The exception comes before the access, but the kernel emulates the
    instruction first and calls the handler after it ("trigger-after-execute"), so the
    handler sees the new value.
  * sparc64: Linux has no hw_breakpoint support (no HAVE_HW_BREAKPOINT); kept that way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HwBreakpointFacts:
    """What an arch's debug registers can do.  `slots` maps a pool ("data", "inst") to its
    number of registers; with `shared_pool` every type takes a "data" slot (x86's DR0-DR3).
    A data breakpoint of length `len` at `addr` must satisfy `addr % align(len) == 0` and lie
    inside one aligned `window`-byte unit; `inst_len` is the one length of an instruction
    breakpoint.  `trap_after`: the handler runs after the access (x86, ppc), else before it
    (arm, arm64).

    A debug exception is per instruction, but Unicorn reports a read-modify-write as a read
    and then a write (x86 `add [mem], 1`), and a store-exclusive as a read (its compare) and a
    write: `read_is_part_of_write` tells those reads apart, so that each instruction
    triggers once, at its write."""

    slots: tuple[tuple[str, int], ...]
    types: frozenset[str]
    lengths: frozenset[int]
    window: int
    inst_len: int
    trap_after: bool
    shared_pool: bool = False
    align_to_len: bool = True
    store_prefixes: tuple[str, ...] = ("st",)
    rmw_operands: bool = False
    unsupported: str | None = None

    def read_is_part_of_write(self, insn) -> bool:
        """Whether a read of memory reported at `insn` (a capstone instruction with details)
        belongs to its write of the same place: a memory operand both read and written (x86,
        from capstone's access flags), or a store mnemonic (load/store ISAs)."""
        if self.rmw_operands:
            return any(op.type == _X86_OP_MEM and op.access == _RW for op in insn.operands)
        return insn.mnemonic.startswith(self.store_prefixes)

    def nr_slots(self, pool: str) -> int:
        return dict(self.slots).get(pool, 0)

    def pool_of(self, bp_type: str) -> str:
        return "inst" if bp_type == "x" and not self.shared_pool else "data"


_X86_OP_MEM = 3         # capstone.x86.X86_OP_MEM
_RW = 3                 # capstone.CS_AC_READ | capstone.CS_AC_WRITE
_X86 = dict(slots=(("data", 4),), types=frozenset({"w", "rw", "x"}), shared_pool=True,
            trap_after=True, rmw_operands=True)
_ARM_TYPES = frozenset({"r", "w", "rw", "x"})

FACTS: dict[str, HwBreakpointFacts] = {
    "x86_64": HwBreakpointFacts(lengths=frozenset({1, 2, 4, 8}), window=8, inst_len=8, **_X86),
    "i386": HwBreakpointFacts(lengths=frozenset({1, 2, 4}), window=4, inst_len=4, **_X86),
    "arm64": HwBreakpointFacts(slots=(("data", 4), ("inst", 6)), types=_ARM_TYPES,
                               lengths=frozenset({1, 2, 4, 8}), window=8, inst_len=4,
                               trap_after=False, align_to_len=False),
    "arm": HwBreakpointFacts(slots=(("data", 4), ("inst", 6)), types=_ARM_TYPES,
                             lengths=frozenset({1, 2, 4}), window=4, inst_len=4,
                             trap_after=False, align_to_len=False,
                             store_prefixes=("st", "push")),
    "ppc": HwBreakpointFacts(slots=(("data", 1),), types=frozenset({"r", "w", "rw"}),
                             lengths=frozenset({1, 2, 4, 8}), window=8, inst_len=0,
                             trap_after=True, align_to_len=False),
    "sparc64": HwBreakpointFacts(slots=(), types=frozenset(), lengths=frozenset(), window=0,
                                 inst_len=0, trap_after=False, unsupported=(
        "sparc64 has no hardware breakpoint support in Linux (no HAVE_HW_BREAKPOINT: its "
        "watchpoint registers are not driven by kernel/events/hw_breakpoint.c)")),
}


def hw_breakpoint_facts(arch: str) -> HwBreakpointFacts:
    return FACTS[arch]

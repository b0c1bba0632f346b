"""One CPU's debug registers, and the debug exception they raise.

Each CPU owns its registers (x86 DR0-DR3, arm's watchpoint and breakpoint value/control
pairs, ppc's DABR): a breakpoint installed on one CPU watches that CPU's accesses only.  A
register in use is a Unicorn hook on that CPU's instance, over the watched range only
(memory hooks for data, a code hook on one address for an instruction breakpoint), and a
CPU with no breakpoint has no hook at all: code that touches no watched byte runs as fast
as before, and the probe hit path never sees any of it.

Unicorn calls a memory hook before the access, with the PC at the accessing instruction.
That is the arm/arm64 watchpoint exactly (a fault before the access: the handler sees the
old value; the kernel then steps over the access and re-arms, which here is letting the
instruction complete).  For a trap after the access (x86, and ppc, whose kernel emulates
the instruction before calling the handler) the store's value is written first, so the
handler reads the new value, and `regs.ip` is the next instruction.  The accessing
instruction's own register results are not visible yet to such a handler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import unicorn

from ..machine._services import regs_class

if TYPE_CHECKING:    # pragma: no cover
    from ..machine._cpu import CPU
    from ..machine._services import HwBreakpointServices
    from ._core import HwBreakpoint, HwBreakpointSubsystem

_READ, _WRITE = unicorn.UC_MEM_READ, unicorn.UC_MEM_WRITE
# The widest single access Unicorn reports: a hook range starts this much lower, so that an
# access beginning below the watched bytes but covering them is seen too.
_MAX_ACCESS = 16


class TriggerData:
    """`data` of `triggered(bp, data, regs)` (the kernel's perf_sample_data): the address
    accessed, the CPU, the access ("r", "w" or "x") and the accessing instruction."""

    __slots__ = ("addr", "cpu", "access", "insn")

    def __init__(self, addr: int, cpu: int, access: str, insn: int):
        self.addr = addr
        self.cpu = cpu
        self.access = access
        self.insn = insn

    def __repr__(self) -> str:
        return f"<hw_breakpoint data addr={self.addr:#x} cpu={self.cpu} {self.access}>"


class DebugRegisters:
    """The debug registers of one CPU: a slot table per pool and the hooks of the slots in
    use.  `task` is the task whose per-task breakpoints are loaded."""

    def __init__(self, cpu: "CPU", subsystem: "HwBreakpointSubsystem",
                 kernel: "HwBreakpointServices"):
        self.cpu = cpu
        self._sub = subsystem
        self._kernel = kernel
        self._facts = subsystem.facts
        self.slots: dict[str, list] = {pool: [None] * n for pool, n in self._facts.slots}
        self._hooks: dict[int, list[int]] = {}        # id(bp) -> Unicorn hook handles
        self.task = None
        self._decoded: dict[tuple[int, bytes], tuple[int, bool]] = {}
        self.Regs = regs_class(cpu.backend)

    def holds(self, bp: "HwBreakpoint") -> bool:
        return id(bp) in self._hooks

    def breakpoints(self) -> list[tuple[str, int, "HwBreakpoint"]]:
        return [(pool, i, bp) for pool, regs in self.slots.items()
                for i, bp in enumerate(regs) if bp is not None]

    # -- arch_install_hw_breakpoint / arch_uninstall_hw_breakpoint ------------------------
    def install(self, bp: "HwBreakpoint") -> bool:
        if self.holds(bp):
            return True
        regs = self.slots.get(bp.pool)
        if regs is None or None not in regs:
            # The constraint table makes this impossible; the kernel WARNs the same way.
            self._sub.slot_warning(self.cpu, bp)
            return False
        regs[regs.index(None)] = bp
        uc = self.cpu.uc
        if bp.type == "x":
            handles = [uc.hook_add(unicorn.UC_HOOK_CODE, self._execute, bp, bp.addr, bp.addr)]
            # Blocks translated before the hook carry no call to it.
            self.cpu.flush_tb(bp.addr, bp.addr + 1)
        else:
            lo, hi = max(0, bp.addr - _MAX_ACCESS + 1), bp.addr + bp.len - 1
            handles = []
            if "r" in bp.type:
                handles.append(uc.hook_add(unicorn.UC_HOOK_MEM_READ, self._access, bp, lo, hi))
            if "w" in bp.type:
                handles.append(uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, self._access, bp, lo, hi))
        self._hooks[id(bp)] = handles
        return True

    def uninstall(self, bp: "HwBreakpoint") -> None:
        handles = self._hooks.pop(id(bp), None)
        if handles is None:
            return
        for h in handles:
            self.cpu.uc.hook_del(h)
        regs = self.slots[bp.pool]
        regs[regs.index(bp)] = None

    def load_task(self, task) -> None:
        """Context switch: the outgoing task's breakpoints leave this CPU's registers and the
        incoming one's take their place (the kernel's perf sched-out/sched-in)."""
        if self.task is not None and self.task is not task:
            for bp in self.task.hw_breakpoints:
                self.uninstall(bp)
        self.task = task
        if task is not None:
            for bp in task.hw_breakpoints:
                if not bp.attr.disabled:
                    self.install(bp)

    # -- the debug exception -------------------------------------------------------------
    def _access(self, _uc, access, addr, size, value, bp: "HwBreakpoint"):
        if addr >= bp.addr + bp.len or addr + size <= bp.addr:
            return          # the hook range starts early; this access misses the bytes
        cpu = self.cpu
        try:
            pc = cpu.pc
            if access == _READ and self._decode(pc)[1]:
                return      # the write that follows triggers, once for the instruction
            self._sub.trigger(cpu, bp, addr, "w" if access == _WRITE else "r", pc,
                              (size, value) if access == _WRITE else None)
        except BaseException as exc:     # never lose an exception inside Unicorn
            self._kernel.on_hook_exception(cpu, exc)

    def _execute(self, _uc, addr, _size, bp: "HwBreakpoint"):
        cpu = self.cpu
        try:
            self._sub.trigger(cpu, bp, addr, "x", addr, None)
        except BaseException as exc:
            self._kernel.on_hook_exception(cpu, exc)

    def _decode(self, pc: int) -> tuple[int, bool]:
        """The length of the instruction at `pc`, and whether a read it makes is part of its
        write; decoded once per instruction (and again if its bytes change)."""
        backend = self.cpu.backend
        code = self._kernel.peek(pc, backend.max_insn_len)
        key = (pc, code)
        known = self._decoded.get(key)
        if known is None:
            insn = next(backend.disassembler().disasm(code, pc, 1), None)
            known = self._decoded[key] = (0, False) if insn is None else \
                (insn.size, self._facts.read_is_part_of_write(insn))
        return known

    def next_ip(self, pc: int) -> int:
        return pc + (self.cpu.backend.fixed_insn_len or self._decode(pc)[0])

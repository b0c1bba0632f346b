"""What the CPUs call back into (`CpuHost`): traps, hypercalls and exceptions raised in a
Unicorn callback; and the trap handler the probe core installs.  A mixin of `SMPMachine`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:    # pragma: no cover
    from ._cpu import CPU

# Virtual cost of taking a trap or a hypercall inside a quantum, so that time read in a
# handler moves on between two traps of the same quantum.
TRAP_COST_NS = 50


class Traps:
    """The trap part of `SMPMachine` (see `_machine`)."""

    @property
    def trap_handler(self) -> Callable[[CPU, int], bool | int] | None:
        """trap_handler(cpu, addr), for a breakpoint trap at addr, returns False if the
        trap is not the probe core's, True if handled (the PC set as needed), or an int:
        handled, resume there.  That last form lets the hottest path (a boosted probe hit)
        leave the PC write to the CPU's hook, the only place it costs no Python call."""
        return self._trap_handler

    @trap_handler.setter
    def trap_handler(self, handler) -> None:
        self._trap_handler = handler
        self._install_breakpoint_vectors()

    @property
    def trap_delay(self) -> float:
        """The probability that a breakpoint trap is handled only in the CPU's next quantum
        (see on_trap)."""
        return self._trap_delay

    @trap_delay.setter
    def trap_delay(self, p: float) -> None:
        self._trap_delay = p
        self._install_breakpoint_vectors()

    def _install_breakpoint_vectors(self) -> None:
        """A machine that never defers a trap lets each CPU hand its breakpoint traps
        straight to the trap handler (CPU.breakpoint_vector): on_trap's work for them,
        without the call through on_trap on every probe hit."""
        cpus = getattr(self, "cpus", None)
        if cpus is None:
            return              # still booting: the CPUs come later
        handler = getattr(self, "_trap_handler", None)
        vector = None
        if handler is not None and not self._trap_delay:
            vector = (self._trap_intno, self._trap_pc_offset, TRAP_COST_NS, handler)
        for cpu in cpus:
            cpu.breakpoint_vector = vector

    def on_trap(self, cpu: CPU, intno: int, pc: int) -> int | None:
        """A trap inside a quantum, at `pc`.  Returns the address to resume at when the
        trap handler gives one (the CPU writes it, see `trap_handler`), else None.

        The hot path of every probe hit: one call into the probe core.  An exception raised
        here reaches the CPU's hook, which turns it into an oops, as _dispatch_trap would."""
        if intno != self._trap_intno:
            self._foreign_trap(cpu, intno)
            return
        self._c.traps += 1
        cpu.intra += TRAP_COST_NS
        addr = pc - self._trap_pc_offset
        if self._trap_delay and not cpu.nesting \
                and self.conductor.chance("defer", self._trap_delay) \
                and self._trap_handler is not None:
            # The trap is taken now but handled in the CPU's next quantum, with other CPUs
            # running in between: the window in which a probe can be removed under it.
            cpu.deferred_trap = True
            cpu.deferred_addr = addr
            self._c.deferred_traps += 1
            cpu.stop_requested = True
            return
        handler = self._trap_handler
        handled = handler is not None and handler(cpu, addr)
        if handled.__class__ is int:
            return handled
        if not handled and cpu.current is not None:
            self.on_unowned_trap(cpu, addr)
        return None

    def _foreign_trap(self, cpu: CPU, intno: int) -> None:
        if self.backend.unicorn.handle_firmware_trap(cpu, intno):
            return      # the arch's firmware took it (sparc64 register windows)
        self._c.traps += 1
        cpu.intra += TRAP_COST_NS
        self.kill_current(cpu, f"unhandled trap {intno} at {self.format_addr(cpu.pc)}")

    def _dispatch_trap(self, cpu: CPU, addr: int) -> None:
        """A deferred trap, handled outside any Unicorn hook (see on_trap)."""
        handled = False
        try:
            if self.trap_handler is not None:
                handled = self.trap_handler(cpu, addr)
        except BaseException as exc:
            self.on_hook_exception(cpu, exc)
            return
        if handled.__class__ is int:
            cpu.pc = handled
        elif not handled and cpu.current is not None:
            self.on_unowned_trap(cpu, addr)

    def on_unowned_trap(self, cpu: CPU, addr: int) -> None:
        self.kill_current(cpu, f"breakpoint trap at {self.format_addr(addr)} that no kprobe "
                               f"owns")

    def on_hypercall(self, cpu: CPU, addr: int) -> None:
        self._c.hypercalls += 1
        cpu.intra += TRAP_COST_NS
        self._hypercalls[addr](cpu)

    def on_hook_exception(self, cpu: CPU, exc: BaseException) -> None:
        cpu.stop_requested = True
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise exc
        self.kill_current(cpu, f"internal error in a CPU callback: {type(exc).__name__}: {exc}")

    def resolve_return_address(self, cpu: CPU, addr: int, depth: int) -> tuple[int, int]:
        if self.return_address_resolver is None:
            return addr, depth
        return self.return_address_resolver(cpu, addr, depth)

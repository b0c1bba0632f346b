"""Traps: the one path a breakpoint trap takes, and the other things the CPUs call back into
(`CpuHost`: hypercalls, foreign traps, exceptions raised in a Unicorn callback).  A mixin of
`SMPMachine`.

One trap path
-------------
Each CPU has a single trap sink, `cpu.trap_sink(cpu, addr) -> TrapResult`, which its
interrupt hook calls for every breakpoint trap.  The sink is the registered trap handler (the
probe core's `kprobe_int3_handler`); when `trap_delay` is set it is that same handler wrapped
in the deferral, which takes some traps now and hands them to the handler at the start of
the CPU's next quantum instead.  Either way the handler, and the code a benchmark measures,
are the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:    # pragma: no cover
    from ._cpu import CPU

# Virtual cost of taking a trap or a hypercall inside a quantum, so that time read in a
# handler moves on between two traps of the same quantum.
TRAP_COST_NS = 50


class TrapResult:
    """What a trap handler did with a breakpoint trap, for the CPU to act on:
      NOT_MINE ......... no breakpoint of the handler's: the task oopses (an unowned trap);
      HANDLED .......... handled, the PC is where it must be;
      resume_at(addr) .. handled, the CPU goes on at `addr` (the CPU writes the PC itself:
                         inside its hook that costs no Python call, the hottest path's
                         saving).
    Immutable; the probe core keeps one per probe for its hot path."""

    __slots__ = ("owned", "resume")

    def __init__(self, owned: bool, resume: int | None = None):
        self.owned = owned
        self.resume = resume

    def __repr__(self) -> str:
        if not self.owned:
            return "NOT_MINE"
        return "HANDLED" if self.resume is None else f"resume_at({self.resume:#x})"


NOT_MINE = TrapResult(False)
HANDLED = TrapResult(True)


def resume_at(addr: int) -> TrapResult:
    return TrapResult(True, addr)


TrapHandler = Callable[["CPU", int], TrapResult]


def _no_handler(cpu: "CPU", addr: int) -> TrapResult:
    return NOT_MINE


class Traps:
    """The trap part of `SMPMachine` (see `_machine`)."""

    def register_trap_handler(self, handler: TrapHandler) -> None:
        """The handler of every breakpoint trap (the kernel's int3 / brk / trap handler)."""
        self._trap_handler = handler
        self._install_trap_sinks()

    @property
    def trap_delay(self) -> float:
        """The probability that a breakpoint trap is handled only in the CPU's next quantum."""
        return self._trap_delay

    @trap_delay.setter
    def trap_delay(self, p: float) -> None:
        self._trap_delay = p
        self._install_trap_sinks()

    def _install_trap_sinks(self) -> None:
        cpus = getattr(self, "cpus", None)
        if cpus is None:
            return              # still booting: the CPUs come later
        handler = self._trap_handler
        sink = self._deferring(handler) if self._trap_delay else handler
        for cpu in cpus:
            cpu.trap_sink = sink

    def _deferring(self, handler: TrapHandler) -> TrapHandler:
        """`handler`, wrapped in the deferral: with probability `trap_delay` (drawn from the
        conductor) the trap is taken now but handled in the CPU's next quantum, with other
        CPUs running in between - the window in which a probe can be removed under it."""
        p = self._trap_delay
        owned = handler is not _no_handler
        counters = self._c

        def deferring_sink(cpu: "CPU", addr: int) -> TrapResult:
            if not cpu.nesting and self.conductor.chance("defer", p) and owned:
                cpu.deferred_trap = True
                cpu.deferred_addr = addr
                counters.deferred_traps += 1
                cpu.stop_requested = True
                return HANDLED
            return handler(cpu, addr)
        return deferring_sink

    def _dispatch_deferred_trap(self, cpu: "CPU") -> None:
        """A deferred trap, handed to the trap handler outside any Unicorn hook."""
        cpu.deferred_trap = False
        cpu.stop_requested = False
        addr = cpu.deferred_addr
        # As in the CPU's trap hook, everything the handler's result leads to is inside the
        # guard: a broken result (a mutant's None) is an internal error that kills the task,
        # not an exception that ends the CPU's trio task and leaves the host waiting.
        try:
            result = self._trap_handler(cpu, addr)
            if result.resume is not None:
                if result.resume == addr:
                    cpu.note_retrap(addr)
                cpu.pc = result.resume
            elif not result.owned and cpu.current is not None:
                self.on_unowned_trap(cpu, addr)
        except BaseException as exc:
            self.on_hook_exception(cpu, exc)

    # -- CpuHost ---------------------------------------------------------------------------
    def on_foreign_trap(self, cpu: "CPU", intno: int) -> None:
        """A trap that is not the breakpoint's."""
        if self.backend.unicorn.handle_firmware_trap(cpu, intno):
            return      # the arch's firmware took it (sparc64 register windows)
        self._c.traps += 1
        cpu.intra += TRAP_COST_NS
        self.kill_current(cpu, f"unhandled trap {intno} at {self.format_addr(cpu.pc)}")

    def on_unowned_trap(self, cpu: "CPU", addr: int) -> None:
        self.kill_current(cpu, f"breakpoint trap at {self.format_addr(addr)} that no kprobe "
                               f"owns")

    def on_hypercall(self, cpu: "CPU", addr: int) -> None:
        self._c.hypercalls += 1
        cpu.intra += TRAP_COST_NS
        self._hypercalls[addr](cpu)

    def on_hook_exception(self, cpu: "CPU", exc: BaseException) -> None:
        cpu.stop_requested = True
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            # Not an oops: the user asked to stop.  Raised again once Unicorn returns.
            cpu.pending_exception = exc
            return
        self.kill_current(cpu, f"internal error in a CPU callback: {type(exc).__name__}: {exc}")

    # -- the other hooks the probe core registers ------------------------------------------
    def register_fault_fixup(self, fixup: Callable[["CPU", Exception], bool]) -> None:
        """Asked first when the guest faults (kprobe_fault_handler); True: handled."""
        self._fault_fixup = fixup

    def register_return_address_resolver(
            self, resolver: Callable[["CPU", int, int], tuple[int, int]]) -> None:
        """Turns a return address the unwinder met (the kretprobe trampoline) into the real
        one: resolver(cpu, addr, depth) -> (addr, depth)."""
        self._return_address_resolver = resolver

    def resolve_return_address(self, cpu: "CPU", addr: int, depth: int) -> tuple[int, int]:
        if self._return_address_resolver is None:
            return addr, depth
        return self._return_address_resolver(cpu, addr, depth)

"""What kernel code beside the machine may use of it: `KernelServices` (the probe core's) and
`HwBreakpointServices` (the hw_breakpoint layer's, at the end of this module).

The probe core holds one of these, never the machine.  Each member is something the
kernel's kprobes code gets from the rest of the kernel, under the kernel's name where it has
one:

  facts .............. backend (the arch), cpus, ncpus, preempt, kallsyms, kernel_text,
                       kprobes_text, insn_slot_area
  text patching ...... text_poke_batch (text_poke_bp: write, then sync every CPU by IPI);
                       text_poke_start / text_poke_finish (the same, in two halves);
                       code_written (where instructions start, for the block counter)
  grace periods ...... synchronize; register_unquiescent_text (where a CPU is never in a
                       quiescent state: the instruction slots, as RCU-tasks sees them);
                       quiescent, preempted_task_pcs, completed_grace_periods (the
                       optprobe optimizer's own grace periods); sleep_ns
  kernel text ........ peek / poke (reads and writes the kernel does through its own
                       mapping), module_of
  symbols ............ format_addr, symbolize, resolve_function
  host actions ....... host_turn (a registration waits for its seeded turn, see _hostturns);
                       register_text_write_guard (may refuse a host write into text)
  traps .............. register_trap_handler (the int3 handler: one per machine),
                       register_fault_fixup (kprobe_fault_handler), register_return_address_
                       resolver (the unwinder's kretprobe hook)
  notifications ...... subscribe(TaskExited | TaskOopsed | ModuleGoing | QuantumEnded, fn)
  per-CPU data ....... define_per_cpu(factory) (DEFINE_PER_CPU: one instance per CPU)
  reporting .......... printk, kill_current (oops the current task), count_stray_trap,
                       trace / trace_event / now_ns (the event trace and its clock)

The types that go with them are re-exported here too (TrapResult, the events, Regs,
TRAP_COST_NS), so neither layer imports anything else of the machine (tests/test_layers.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, TypeVar

from . import _memory as mem

if TYPE_CHECKING:    # pragma: no cover
    from ._cpu import CPU
    from ._machine import SMPMachine
    from ._modules import Module
    from ._traps import TrapHandler

from ._events import Event as Event
from ._events import EventBus as EventBus
from ._events import ModuleGoing as ModuleGoing
from ._events import QuantumEnded as QuantumEnded
from ._memory import STACK_SIZE as STACK_SIZE     # a task stack's size (tracefs: $stackN)
from ._events import TaskExited as TaskExited
from ._events import TaskOopsed as TaskOopsed
from ._events import TaskScheduledIn as TaskScheduledIn
from ._traps import HANDLED as HANDLED
from ._traps import TRAP_COST_NS as TRAP_COST_NS
from ._traps import NOT_MINE as NOT_MINE
from ._traps import TrapResult as TrapResult
from ._traps import resume_at as resume_at
from ._regs import Regs as Regs
from ._regs import regs_class as regs_class

T = TypeVar("T")


class KernelServices:
    """The machine as the probe core sees it (see the module docstring)."""

    def __init__(self, machine: "SMPMachine"):
        m = machine
        self.backend = m.backend
        self.cpus: tuple["CPU", ...] = tuple(m.cpus)
        self.ncpus = m.ncpus
        self.preempt = m.preempt
        self.kallsyms = m.kallsyms
        text = m.kernel.sections[".text"]
        self.kernel_text = (text[0], text[0] + text[1])
        self.kprobes_text = m.kprobes_text
        # The executable area reserved for instruction slots (as module_alloc gives them).
        self.insn_slot_area = (mem.SLOTS.start, mem.SLOTS.end)
        # The event trace: the hit path appends to it directly (one list append per event).
        self.trace: list[tuple] = m.trace
        # Bound methods, taken once: a member is one attribute lookup, as on the machine.
        self.text_poke_batch = m.text_poke_batch
        # The optprobe optimizer runs between quanta and cannot await: it starts a poke
        # and polls its IPIs; it also tells the quanta's block counter where instructions
        # start once a jump's tail was written alone.
        self.text_poke_start = m.text_poke_start
        self.text_poke_finish = m.text_poke_finish
        self.code_written = m.insn_starts.code_written
        self.optinsn_area = (mem.OPTINSN.start, mem.OPTINSN.end)
        self.quiescent = m.quiescent
        self.preempted_task_pcs = m.preempted_task_pcs
        self.completed_grace_periods = m.completed_grace_periods
        self.sleep_ns = m.sleep_ns
        self.synchronize = m.synchronize
        self.register_unquiescent_text = m.register_unquiescent_text
        self.peek = m.memory.peek
        self.poke = m.memory.poke
        self.module_of: Callable[[int], "Module | None"] = m.module_of
        self.format_addr = m.format_addr
        self.symbolize = m.symbolize
        self.resolve_function = m.resolve_function
        self.host_turn = m.host_turn
        self.register_text_write_guard = m.register_text_write_guard
        self.register_trap_handler: Callable[["TrapHandler"], None] = m.register_trap_handler
        self.register_fault_fixup = m.register_fault_fixup
        self.register_return_address_resolver = m.register_return_address_resolver
        self.subscribe = m.events.subscribe
        self.kill_current = m.kill_current
        self.count_stray_trap = m.count_stray_trap
        self.trace_event = m.trace_event
        self.now_ns = m.now_ns
        self._printk_log = m.printk_log

    def printk(self, line: str) -> None:
        self._printk_log.append(line)

    def define_per_cpu(self, factory: Callable[[], T]) -> tuple[T, ...]:
        """One instance per CPU, indexed by CPU id (`per_cpu(var, cpu)` is `var[cpu.id]`)."""
        return tuple(factory() for _ in self.cpus)

    def __repr__(self) -> str:
        return f"<KernelServices {self.backend.name} cpus={self.ncpus}>"

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"KernelServices has no {name!r}: the probe core reaches the "
                             f"machine only through the members listed in _services")


class HwBreakpointServices:
    """The machine as the hw_breakpoint layer sees it (`hw_breakpoint.HwBreakpointSubsystem`
    holds one of these, never the machine):

      facts .............. arch, backend, cpus, ncpus
      memory ............. region_of (is an address mapped), peek (the instruction at a
                           PC, decoded), poke (the store a trap-after watchpoint makes
                           before its handler runs)
      symbols ............ kallsyms_lookup_name, format_addr
      cross-CPU calls .... smp_call_function_many (install / uninstall on each CPU)
      notifications ...... subscribe(TaskScheduledIn | TaskExited, fn) (a task's breakpoints
                           follow it)
      the debug exception  on_hook_exception (an exception inside a CPU's watch hook),
                           kill_current (a handler raised: oops the task)
      reporting .......... printk, trace_event / now_ns
    """

    def __init__(self, machine: "SMPMachine"):
        m = machine
        self.arch = m.arch
        self.backend = m.backend
        self.cpus: tuple["CPU", ...] = tuple(m.cpus)
        self.ncpus = m.ncpus
        self.region_of = m.memory.region_of
        self.peek = m.memory.peek
        self.poke = m.memory.poke
        self.kallsyms_lookup_name = m.kallsyms_lookup_name
        self.format_addr = m.format_addr
        self.smp_call_function_many = m.smp_call_function_many
        self.subscribe = m.events.subscribe
        self.on_hook_exception = m.on_hook_exception
        self.kill_current = m.kill_current
        self.trace_event = m.trace_event
        self.now_ns = m.now_ns
        self._printk_log = m.printk_log

    def printk(self, line: str) -> None:
        self._printk_log.append(line)

    def __repr__(self) -> str:
        return f"<HwBreakpointServices {self.arch} cpus={self.ncpus}>"

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"HwBreakpointServices has no {name!r}: the hw_breakpoint layer "
                             f"reaches the machine only through the members listed in "
                             f"_services")

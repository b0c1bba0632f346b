"""The probe core, assembled: `KprobesSubsystem` (`m.kprobes`) and its introspection.

The subsystem is one object, written in one module per concept:
  _probes.py ..... the user-facing objects: Kprobe, Jprobe, Kretprobe, kretprobe instances
  _state.py ...... struct kprobe_ctlblk (per CPU) and its status; the aggregate (_Site)
  _registry.py ... register / unregister (batches), arm / disarm, enable / disable, modules
  _hit.py ........ the hit path: the trap handler, single-step, post handlers, reentry, faults
  _kretprobes.py . the kretprobe pool, the entry handler and the trampoline
  _jprobes.py .... setjmp_pre_handler / longjmp
  _slots.py ...... get_insn_slot / free_insn_slot
  _optcheck.py, _optprobe.py  jump optimization: the safety checks; the detour, the
                  optimizer worker and the debug.kprobes-optimization knob
  _debugfs.py, _tracefs.py  the file views

Where the kernel's code would be:
  register_kprobe / unregister_kprobes ......... KprobesSubsystem.register_* / unregister_*
  arm_kprobe / disarm_kprobe ................... _arm / _disarm (text_poke + cross-CPU sync)
  kprobe_handler (do_int3) ..................... KprobesSubsystem._kprobe_handler (a hit),
                                                 _other_trap (step end, trampoline, stray)
  post_kprobe_handler / resume_execution ....... _post_kprobe_handler
  reenter_kprobe ............................... _reenter_kprobe
  kprobe_fault_handler ......................... _fault_fixup, _handler_fault
  struct kprobe_ctlblk (per CPU) ............... KprobeCtlblk, on `cpu.kprobe_ctlblk`
  aggregate kprobe ............................. _Site (one per probed address)
  get_insn_slot / free_insn_slot ............... _slots.InsnSlots
  pre_handler_kretprobe / trampoline_handler ... _pre_handler_kretprobe / _trampoline_handler
  setjmp_pre_handler / longjmp_break_handler ... _setjmp_pre_handler / _longjmp

Every probed address has one `_Site` that owns the saved instruction, the slot and the list
of children (newest first; jprobes last).  Handlers always run from a snapshot of that list,
so a handler may unregister probes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..machine import _memory as mem
from ..machine._regs import regs_class
from ._hit import TRAP_HANDLER_EXCEPTION as TRAP_HANDLER_EXCEPTION
from ._hit import HitPath
from ._jprobes import MAX_STACK_SIZE as MAX_STACK_SIZE
from ._jprobes import Jprobes
from ._kretprobes import Kretprobes
from ._probes import KPROBE_FLAG_DISABLED as KPROBE_FLAG_DISABLED
from ._probes import KPROBE_FLAG_FTRACE as KPROBE_FLAG_FTRACE
from ._probes import KPROBE_FLAG_GONE as KPROBE_FLAG_GONE
from ._probes import KPROBE_FLAG_OPTIMIZED as KPROBE_FLAG_OPTIMIZED
from ._probes import KRETPROBE_MAX_DATA_SIZE as KRETPROBE_MAX_DATA_SIZE
from ._probes import Jprobe as Jprobe
from ._probes import Kprobe
from ._probes import Kretprobe as Kretprobe
from ._probes import KretprobeInstance as KretprobeInstance
from ._probes import PoolStatistics as PoolStatistics
from ._probes import jprobe_return as jprobe_return
from ._probes import regs_return_value as regs_return_value
from ._optprobe import Optimizer
from ._registry import Registry
from ._slots import InsnSlots
from ._state import KprobeCtlblk
from ._state import Status as Status
from ._state import _Site

if TYPE_CHECKING:    # pragma: no cover
    from ..machine._machine import SMPMachine

BLACKLIST = ("do_page_fault", "notifier_call_chain")


@dataclass(frozen=True)
class KprobesStatistics:
    probes: int
    sites: int
    armed: int
    hits: int
    missed: int
    traps: int
    stray_traps: int
    slots_used: int
    # Jump optimization (_optprobe): sites with their jump written, sites that pass the
    # safety checks but run as plain kprobes now, and sites queued for the optimizer.
    optimized: int = 0
    unoptimized: int = 0
    optimizing: int = 0


# == the subsystem =====================================================================
class KprobesSubsystem(Registry, HitPath, Kretprobes, Jprobes):
    """`m.kprobes`."""

    def __init__(self, machine: "SMPMachine"):
        self._m = machine
        self._backend = machine.backend
        self._bp = machine.backend.breakpoint
        self._table: dict[int, _Site] = {}
        self._by_slot: dict[int, _Site] = {}
        self._mutex = trio.Lock()           # kprobe_mutex
        self.enabled = True                 # kprobes/enabled
        self._boundaries: dict[int, frozenset[int]] = {}
        # Traps at a registered probe, and how each ended: a hit, a miss (reentry) or an
        # unrecoverable reentry.  The invariant checker compares them after every quantum.
        self.hits = self.missed = self.traps = self.unrecoverable = 0
        # Handlers of unregistered probes that were about to run: a bug, recorded where it
        # happens for the invariant checker to report: (address, probe, "pre_handler",
        # "post_handler" or "return handler"; the probe is the Kretprobe for the last).
        self.stale_handlers: list[tuple[int, Kprobe, str]] = []
        self._slot_stride = self._backend.slot_size // 2
        self.slots = InsnSlots(self._backend.slot_size, machine.synchronize, self._cpu_in_range)
        # Hot-path constants, looked up once.
        self._slot_lo, self._slot_hi = mem.SLOTS.start, mem.SLOTS.end
        self._trace = machine.trace
        self._Regs = regs_class(machine.backend)
        k = machine.kallsyms
        self._trampoline = k.lookup("kretprobe_trampoline").addr
        self._trampoline_site = _Site(self._trampoline, None, b"")
        self._jprobe_return = k.lookup("jprobe_return").addr
        text = machine.kernel.sections[".text"]
        self._kernel_text = (text[0], text[0] + text[1])
        self._blacklist = []
        for name in BLACKLIST:
            s = k.lookup(name)
            if s is not None:
                self._blacklist.append((s.addr, s.addr + max(s.size, 1), name))
        for cpu in machine.cpus:
            cpu.kprobe_ctlblk = KprobeCtlblk()
        machine.trap_handler = self._kprobe_handler
        machine.fault_fixup = self._fault_fixup
        machine.return_address_resolver = self._resolve_return_address
        machine.task_exit_notifiers.append(self._kprobe_flush_task)
        machine.oops_notifiers.append(self._oops_reset)
        machine.module_notifiers.append(self._module_event)
        self.simulation_errors: list[str] = []
        self.optimizer = Optimizer(self, machine)

    # -- introspection ------------------------------------------------------------------
    def statistics(self) -> KprobesStatistics:
        return KprobesStatistics(
            probes=sum(len(s.children) for s in self._table.values()), sites=len(self._table),
            armed=sum(s.armed for s in self._table.values()), hits=self.hits,
            missed=self.missed, traps=self.traps,
            stray_traps=self._m.statistics().stray_traps,
            slots_used=self.slots.statistics()["used"],
            **dataclasses.asdict(self.optimizer.statistics()))

    def probes(self) -> list[tuple[int, Kprobe]]:
        """(address, probe) for every registered probe, sorted by address then list order."""
        return [(a, c) for a in sorted(self._table) for c in self._table[a].children]

    def sites(self) -> dict[int, _Site]:
        return dict(self._table)

    def blacklist(self) -> list[tuple[int, int, str]]:
        k = self._m.kallsyms
        lo, hi = self._m.kprobes_text
        ranges = list(self._blacklist)
        for s in k.functions():
            if lo <= s.addr < hi:
                ranges.append((s.addr, s.addr + s.size, s.name))
        return sorted(ranges)

    def original_text(self, addr: int, size: int) -> bytes:
        """Text as it would be without any breakpoint (recover_probed_instruction)."""
        buf = bytearray(self._m.memory.peek(addr, size))
        n = len(self._bp)
        for a in range(addr - n + 1, addr + size):
            site = self._table.get(a)
            if site is not None and site.armed:
                for i in range(n):
                    if 0 <= a + i - addr < size:
                        buf[a + i - addr] = site.orig[i]
        self.optimizer.recover(buf, addr)
        return bytes(buf)

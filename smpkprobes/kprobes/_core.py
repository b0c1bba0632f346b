"""The probe core, assembled: `KprobesSubsystem` (`m.kprobes`) and its introspection.

It sees the machine only through `KernelServices` (machine/_services.py), and publishes its
arming and registrations on `events` (kprobes/_events.py).  The subsystem is one object,
written in one module per concept:
  _probes.py ..... the user-facing objects: Kprobe, Jprobe, Kretprobe and its instance pool
  _state.py ...... struct kprobe_ctlblk (per CPU) and its status; the aggregate (AggrKprobe)
  _registry.py ... register / unregister (batches), arm / disarm, enable / disable, modules
  _hit.py ........ the hit path: kprobe_int3_handler, setup_singlestep, reenter_kprobe, ...
  _kretprobes.py . the kretprobe entry handler, the trampoline, the per-task instances
  _jprobes.py .... setjmp_pre_handler / longjmp_break_handler
  _slots.py ...... get_insn_slot / free_insn_slot
  _optcheck.py, _optprobe.py  jump optimization: the safety checks; the detour, the
                  optimizer and the debug.kprobes-optimization knob
  _debugfs.py, _tracefs.py  the file views

Where the kernel's code would be:
  register_kprobe / unregister_kprobes ......... KprobesSubsystem.register_* / unregister_*
  arm_kprobe / disarm_kprobe ................... arm_kprobes / disarm_kprobes (text_poke)
  get_kprobe ................................... get_kprobe (the kprobe table)
  kprobe_int3_handler .......................... kprobe_int3_handler (every breakpoint trap)
  aggr_pre_handler / setup_singlestep .......... the same names, in _hit.py
  post_kprobe_handler / resume_execution ....... post_kprobe_handler
  reenter_kprobe ............................... reenter_kprobe
  kprobe_fault_handler ......................... kprobe_fault_handler, _step_fault_fixup
  struct kprobe_ctlblk, current_kprobe ......... kprobe_ctlblk[cpu.id] (a KprobeCtlblk, with
                                                 current_kprobe and kprobe_status)
  aggregate kprobe ............................. AggrKprobe (one per probed address)
  get_insn_slot / free_insn_slot ............... _slots.InsnSlots
  pre_handler_kretprobe / trampoline_handler ... the same names, in _kretprobes.py
  kretprobe_inst_table / kprobe_flush_task ..... the same names (instances in flight, by task)
  setjmp_pre_handler / longjmp_break_handler ... the same names, in _jprobes.py
  kprobes_module_callback ...................... the same name (module text going away)

Every probed address has one `AggrKprobe` that owns the saved instruction, the slot and the
list of children (newest first; jprobes last).  Handlers always run from a snapshot of that
list, so a handler may unregister probes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import trio

from ..machine._services import (EventBus, KernelServices, ModuleGoing, TaskExited, TaskOopsed,
                                 regs_class)
from ._events import KprobesChanged
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
from ._probes import KretprobeInstance
from ._probes import PoolStatistics as PoolStatistics
from ._probes import jprobe_return as jprobe_return
from ._probes import regs_return_value as regs_return_value
from ._optprobe import Optimizer
from ._registry import Registry
from ._slots import InsnSlots
from ._state import KprobeCtlblk
from ._state import Status as Status
from ._state import AggrKprobe

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
    # Jump optimization (_optprobe): probes with their jump written, probes that pass the
    # safety checks but run as plain kprobes now, and probes queued for the optimizer.
    optimized: int = 0
    unoptimized: int = 0
    optimizing: int = 0


class KprobeMutex:
    """kprobe_mutex: a trio lock whose release first tells the observers that a registry
    operation is over (`KprobesChanged`), so they check a settled registry."""

    def __init__(self, events: EventBus):
        self._lock = trio.Lock()
        self._events = events

    async def __aenter__(self):
        await self._lock.acquire()

    async def __aexit__(self, *exc):
        try:
            if self._events.wants(KprobesChanged):
                self._events.publish(KprobesChanged())
        finally:
            self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


# == the subsystem =====================================================================
class KprobesSubsystem(Registry, HitPath, Kretprobes, Jprobes):
    """`m.kprobes`: the probe core, on the machine's `KernelServices`."""

    # The hit path reads this object's attributes on every trap.  CPython (3.11+) keeps an
    # instance's attributes in a fast inline array, and specializes the reads of them and
    # of its methods, only while it has at most 30: with 31 (the cold facts kept here
    # before) a boosted hit cost about 10% more.  Keep it under that (tests/test_machine.py
    # checks), and derive what the hit path never reads (the properties below).
    MAX_INSTANCE_ATTRIBUTES = 30

    def __init__(self, kernel: KernelServices):
        self._kernel = kernel
        self._backend = kernel.backend
        self._kprobe_table: dict[int, AggrKprobe] = {}    # the kprobe hash: address -> probe
        self._by_slot: dict[int, AggrKprobe] = {}
        self.events = EventBus()
        self._mutex = KprobeMutex(self.events)     # kprobe_mutex
        self.enabled = True                 # kprobes/enabled
        self._boundaries: dict[int, frozenset[int]] = {}
        # Per-CPU and per-task state, the probe core's own (DEFINE_PER_CPU; the kretprobe
        # instance hash, keyed by task).
        self.kprobe_ctlblk: tuple[KprobeCtlblk, ...] = kernel.define_per_cpu(KprobeCtlblk)
        self.kretprobe_inst_table: dict[object, list[KretprobeInstance]] = {}
        # Traps at a registered probe, and how each ended: a hit, a miss (reentry) or an
        # unrecoverable reentry.  The invariant checker compares them after every quantum.
        self.hits = self.missed = self.traps = self.unrecoverable = self.stray_traps = 0
        # Bumped on every change of the registry (for the invariant checker).
        self.generation = 0
        # Handlers of unregistered probes that were about to run: a bug, recorded where it
        # happens for the invariant checker to report: (address, probe, "pre_handler",
        # "post_handler" or "return handler"; the probe is the Kretprobe for the last).
        self.stale_handlers: list[tuple[int, Kprobe, str]] = []
        self.simulation_errors: list[str] = []
        # Arming, disarming and kretprobe registrations, for observers (see _events);
        # `self.events` is made above, with the mutex that publishes KprobesChanged.
        self._slot_lo, self._slot_hi = kernel.insn_slot_area
        self.slots = InsnSlots(kernel.insn_slot_area, self._backend.slot_size,
                               kernel.synchronize, self._cpu_in_range)
        # Hot-path constants, looked up once.
        self._trace = kernel.trace
        self._Regs = regs_class(kernel.backend)
        k = kernel.kallsyms
        self._trampoline = k.lookup("kretprobe_trampoline").addr
        self._trampoline_probe = AggrKprobe(self._trampoline, None, b"")
        self._jprobe_return = k.lookup("jprobe_return").addr
        self._blacklist = []
        for name in BLACKLIST:
            s = k.lookup(name)
            if s is not None:
                self._blacklist.append((s.addr, s.addr + max(s.size, 1), name))
        # What the rest of the kernel calls into.
        kernel.register_unquiescent_text(self._slot_lo, self._slot_hi)
        kernel.register_trap_handler(self.kprobe_int3_handler)
        kernel.register_fault_fixup(self._step_fault_fixup)
        kernel.register_return_address_resolver(self._resolve_return_address)
        kernel.register_text_write_guard(self._text_write_guard)
        kernel.subscribe(TaskExited, self.kprobe_flush_task)
        kernel.subscribe(TaskOopsed, self._oops_reset)
        kernel.subscribe(ModuleGoing, self.kprobes_module_callback)
        self.optimizer = self._make_optimizer(kernel)

    # Facts the hit path never reads: derived on use rather than stored (see __init__).
    @property
    def _bp(self) -> bytes:
        return self._backend.breakpoint

    @property
    def _slot_stride(self) -> int:
        return self._backend.slot_size // 2

    @property
    def _kernel_text(self) -> tuple[int, int]:
        return self._kernel.kernel_text

    def _make_optimizer(self, kernel: KernelServices) -> Optimizer:
        """The jump optimizer (kprobe_optimizer and its detours); a mutant may give its
        own."""
        return Optimizer(self, kernel)

    # -- introspection ------------------------------------------------------------------
    def statistics(self) -> KprobesStatistics:
        table = self._kprobe_table
        return KprobesStatistics(
            probes=sum(len(s.children) for s in table.values()), sites=len(table),
            armed=sum(s.armed for s in table.values()), hits=self.hits,
            missed=self.missed, traps=self.traps, stray_traps=self.stray_traps,
            slots_used=self.slots.statistics()["used"],
            **dataclasses.asdict(self.optimizer.statistics()))

    def get_kprobe(self, addr: int) -> AggrKprobe | None:
        """The (aggregate) probe at `addr`, or None: read-only."""
        return self._kprobe_table.get(addr)

    def probes(self) -> list[tuple[int, Kprobe]]:
        """(address, probe) for every registered probe, sorted by address then list order."""
        table = self._kprobe_table
        return [(a, c) for a in sorted(table) for c in table[a].children]

    def sites(self) -> dict[int, AggrKprobe]:
        return dict(self._kprobe_table)

    def blacklist(self) -> list[tuple[int, int, str]]:
        k = self._kernel.kallsyms
        lo, hi = self._kernel.kprobes_text
        ranges = list(self._blacklist)
        for s in k.functions():
            if lo <= s.addr < hi:
                ranges.append((s.addr, s.addr + s.size, s.name))
        return sorted(ranges)

    def insn_boundaries(self, sym) -> frozenset[int]:
        """Where instructions start in function `sym` (a kallsyms symbol)."""
        return self._insn_boundaries(sym)

    def original_text(self, addr: int, size: int) -> bytes:
        """Text as it would be without any breakpoint (recover_probed_instruction)."""
        buf = bytearray(self._kernel.peek(addr, size))
        n = len(self._bp)
        for a in range(addr - n + 1, addr + size):
            site = self._kprobe_table.get(a)
            if site is not None and site.armed:
                for i in range(n):
                    if 0 <= a + i - addr < size:
                        buf[a + i - addr] = site.orig[i]
        self.optimizer.recover(buf, addr)
        return bytes(buf)

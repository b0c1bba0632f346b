"""The simulated SMP machine: shared memory, CPUs as trio tasks, guest tasks, text patching
and grace periods.  `SMPMachine` boots the machine and is its public facade; each concept is
a module of its own:
  _sched.py ....... the conductor loop, the run queue, virtual time, task switches
  _textpoke.py .... text_poke and the IPIs that follow it
  _grace.py ....... grace periods (synchronize, quiescent states)
  _modules.py ..... loadable modules
  _traps.py ....... what the CPUs call back into: traps, hypercall entry, hook exceptions
  _hypercalls.py .. the guest kernel's hypercalls
  _oops.py ........ oops reports
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import trio
import unicorn

from smpkprobes.cpus import get_backend

from . import _memory as mem
from ._blockbudget import InsnStarts
from ._calls import GuestCalls
from ._hostturns import HostTurns
from ._conductor import Conductor, make_conductor
from ._cpu import CPU
from .._errors import MachinePanic, OopsRecord
from ._grace import GracePeriods
from ._hypercalls import NS_PER_MS, Hypercalls
from ._kernel import IMAGES, Image, Kallsyms
from ._modules import Module, Modules
from ._oops import Oopses
from ._sched import Scheduler, _Baton
from ._task import Task
from ._textpoke import TextPoke
from ._events import EventBus, TextWritten
from ._tracefold import fold
from ._traps import TRAP_COST_NS, Traps, _no_handler

# Events the trace keeps by default (about 200 bytes each, with their timestamps): older
# ones only count in the digest.
TRACE_LIMIT = 100_000


@dataclass(frozen=True)
class MachineStatistics:
    """A snapshot of the machine's counters (`Machine.statistics()`)."""

    instructions: int
    grace_periods: int
    text_syncs: int
    stray_traps: int
    oopses: int
    quanta: int
    tasks: int
    context_switches: int
    migrations: int
    preemptions: int
    traps: int
    deferred_traps: int
    hypercalls: int
    per_cpu_instructions: tuple[int, ...]
    per_cpu_tasks: tuple[int, ...]


def _seed_trio_order(seed: int) -> None:
    """Make trio's own run order a function of the machine's seed.

    Trio runs the tasks that are ready at the same moment in an order it draws from a
    generator of its own (`trio._core._run._r`, seeded from the OS and shared by every
    `trio.run` of the process), and with one of two methods: a coin that reverses the batch,
    or, once Hypothesis has been imported (its trio plugin), a shuffle of the batch sorted by
    creation.  The machine keeps that order out of what the guest sees (host turns, sorted
    admission), but host tasks woken at the same quantum boundary (a guest call returning
    while a grace period ends) still ran in it, and scenario code that shares state between
    them (a counter, a flag) then ran differently from run to run, with what the process ran
    before, and between a test process and a Dask worker.  Here, at the start of every
    machine, the method is fixed to the sorted shuffle (Hypothesis's: whatever the process
    imported, it is the same) and the generator is seeded from the seed.  (Private
    attributes: trio is pinned, and tests/test_determinism.py fails if they go away.)"""
    from trio._core import _run
    rng = getattr(_run, "_r", None)
    if isinstance(rng, random.Random) and hasattr(_run, "_ALLOW_DETERMINISTIC_SCHEDULING"):
        _run._ALLOW_DETERMINISTIC_SCHEDULING = True
        rng.seed(f"smpkprobes trio order {seed}")


class _Counters:
    def __init__(self):
        for f in fields(MachineStatistics):
            if not f.name.startswith("per_cpu"):
                setattr(self, f.name, 0)



class SMPMachine(GuestCalls, HostTurns, Scheduler, TextPoke, GracePeriods, Modules, Traps,
                 Hypercalls, Oopses):
    """The machine, without the probe core: `smpkprobes.Machine` puts the two together.
    What kernel code beside it (the probe core) may use is `KernelServices` (`_services`)."""

    def __init__(self, arch: str = "x86_64", cpus: int = 4, seed: int = 0, preempt: bool = False,
                 kernel: str | Path | None = None, *, quantum: tuple[int, int] = (16, 4096),
                 call_budget: int = 20_000_000, preempt_prob: float = 0.25,
                 trap_delay: float = 1 / 16, ipi_delay: int = 2, text_sync: bool = True,
                 conductor=None, trace_limit: int = TRACE_LIMIT):
        if cpus < 1:
            raise ValueError("a machine needs at least one CPU")
        if not isinstance(trace_limit, int) or isinstance(trace_limit, bool):
            raise TypeError(f"trace_limit must be an int (events kept), not "
                            f"{type(trace_limit).__name__}")
        if trace_limit < 1:
            raise ValueError(f"trace_limit must be at least 1, not {trace_limit}")
        self.trace_limit = trace_limit
        self.backend = get_backend(arch)
        self.arch = arch
        self.ncpus = cpus
        self.seed = seed
        self.preempt = preempt
        self.call_budget = call_budget
        self.preempt_prob = preempt_prob
        self.trap_delay = trap_delay
        self.ipi_delay = ipi_delay
        self.text_sync = text_sync
        self.rng = random.Random(seed)
        # A policy name ("random", "pct"), a factory f(rng, qmin, qmax) or a Conductor.
        self.conductor: Conductor = make_conductor(conductor, self.rng, quantum)
        self.memory = mem.PhysicalMemory()
        # Where instructions start, for counting quanta in blocks (_blockbudget).
        code_regions = [r for r in self.memory.regions if r.perms & mem.X]
        self.insn_starts = InsnStarts(max(r.end for r in code_regions),
                                      self.backend.fixed_insn_len, self.backend.insn_length)
        for r in code_regions:
            self.insn_starts.mark_executable(r.start, r.end)
        self.kallsyms = Kallsyms()
        kernel_path = Path(kernel) if kernel is not None else IMAGES / arch / "vmlinux"
        self.kernel = Image.load(kernel_path)
        self._load_image(self.kernel)
        self.kallsyms.add(self.kernel.symbols)
        ksym = self._required_symbol
        self.kprobes_text = (ksym("__kprobes_text_start"), ksym("__kprobes_text_end"))
        hc_start, hc_end = ksym("__hypercall_start"), ksym("__hypercall_end")
        self._hypercalls: dict[int, Callable[[CPU], None]] = {}
        for name in ("console_write", "msleep", "schedule", "do_exit", "ktime_get_ns",
                     "task_return", "call_return"):
            self._hypercalls[ksym("__hc_" + name)] = getattr(self, "_hc_" + name)
        self.idle_addr = ksym("cpu_idle")
        self.task_return_addr = ksym("__hc_task_return")
        self.cpus = [CPU(i, self.backend, self.memory, self, (hc_start, hc_end),
                         ksym("__hc_call_return"), call_budget, self.insn_starts)
                     for i in range(cpus)]
        for cpu in self.cpus:
            cpu.pc = self.idle_addr
            cpu.initial_context = cpu.context_save()
            cpu.trap_cost = TRAP_COST_NS
        self._batons = [_Baton() for _ in self.cpus]     # see _sched
        self._console_lines = ["" for _ in self.cpus]    # each CPU's unfinished printk line
        self.modules: dict[str, Module] = {}
        self.printk_log: list[str] = []
        self.oopses: list[OopsRecord] = []
        self._c = _Counters()
        # The event trace is a ring: the newest `trace_limit` events (up to a quarter more
        # between two compactions); the older ones are folded into the rolling digest.
        self._trace: list[tuple] = []
        self._digest = hashlib.blake2b(digest_size=16)
        self._trace_high = trace_limit + max(1, trace_limit // 4)
        self._runq: deque[Task] = deque()
        self._sleepers: list[tuple[int, int, Task]] = []
        self._pending: list[Task] = []
        self._next_pid = 1
        self._seq = 0
        self._free_stacks = list(range(mem.STACKS.size // mem.STACK_SIZE))
        self._now = 0
        self._decision: tuple[CPU, int] | None = None
        self._host_woken = True
        self._settled = False
        self._idle_event = trio.Event()
        self._sync_waiters: list[list] = []      # [remaining cpu ids, event, acked at]
        self._gp_waiters: list[list] = []
        self.panicked: str | None = None        # why panic() stopped the machine
        self._gp_begun = 0
        self._nursery: trio.Nursery | None = None
        # What the kernel code beside the machine (the probe core) registers; the machine
        # only calls it (see _traps, _grace).
        self._fault_fixup: Callable[[CPU, unicorn.UcError], bool] | None = None
        self._return_address_resolver: Callable[[CPU, int, int], tuple[int, int]] | None = None
        self._unquiescent_text: list[tuple[int, int]] = []
        self._rcu_tasks_text: list[tuple[int, int]] = []
        self.register_trap_handler(_no_handler)
        # Called as guard(addr, size) before a host write into text; may refuse it (raise).
        self._text_write_guards: list[Callable[[int, int], None]] = []
        # Task exits, oopses, modules going, quanta, text written: see _events.
        self.events = EventBus()
        # Awaited when a module's text is in place, before its init runs (MODULE_STATE_COMING).
        self.module_coming_hooks: list = []
        self._init_calls()
        self._init_host_turns()

    # == lifecycle ======================================================================
    async def __aenter__(self):
        _seed_trio_order(self.seed)
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        for cpu in self.cpus:
            self._nursery.start_soon(self._cpu_main, cpu, name=f"smpkprobes-cpu{cpu.id}")
        self._batons[0].set()
        return self

    async def __aexit__(self, *exc):
        self._nursery.cancel_scope.cancel()
        return await self._nursery_cm.__aexit__(*exc)

    # == panic ============================================================================
    def panic(self, reason: str) -> None:
        """Stop the machine for good (a run bound was exceeded): every CPU task is cancelled,
        and host code waiting on the machine, even in a section shielded from cancellation
        (an unregistration between disarm and free), is woken with `MachinePanic` instead
        of waiting for ever.  The tooling's last resort; a run never recovers from it."""
        if self.panicked is not None:
            return
        self.panicked = reason
        self.printk_log.append(f"Kernel panic - not syncing: {reason}")
        for waiters in (self._gp_waiters, self._sync_waiters):
            for w in waiters:
                w[1].set()
            waiters.clear()
        for request in list(getattr(self, "_host_requests", ())):
            request[1].set()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _check_panic(self) -> None:
        if self.panicked is not None:
            raise MachinePanic(self.panicked)

    # == public API =====================================================================
    def kallsyms_lookup_name(self, name: str) -> int:
        """The address of `name`, or 0 when there is no such symbol (as in the kernel)."""
        s = self.kallsyms.lookup(name)
        return 0 if s is None else s.addr

    def symbolize(self, addr: int):
        return self.kallsyms.symbolize(addr)

    def format_addr(self, addr: int) -> str:
        s = self.kallsyms.symbolize(addr)
        if s is None:
            return f"{addr:#x}"
        name, off, module = s
        return f"{name}+{off:#x}" + (f" [{module}]" if module else "")

    def read_memory(self, addr: int, size: int) -> bytes:
        return self.memory.read(addr, size)

    def write_memory(self, addr: int, data: bytes) -> None:
        """Write guest memory.  Into text, the write is checked by the text write guards
        (the probe core refuses to overwrite an armed probe: EBUSY) and every CPU drops its
        translations of the range before it runs again: host code runs between quanta, so
        that is the whole of text_poke's sync (`await m.text_poke` is the traced, IPI-timed
        way)."""
        data = bytes(data)
        region = self.memory.region_of(addr)
        if region is not None and region.perms & mem.X:
            for guard in self._text_write_guards:
                guard(addr, len(data))
            self.memory.write(addr, data)
            self._code_written(addr, data)
            for cpu in self.cpus:
                cpu.flush_tb(addr, addr + len(data))
            if self.events.wants(TextWritten):
                self.events.publish(TextWritten(addr, data))
            return
        self.memory.write(addr, data)

    def register_text_write_guard(self, guard: Callable[[int, int], None]) -> None:
        """`guard(addr, size)` is called before every host write into text (write_memory,
        text_poke) and may refuse it by raising (the probe core: EBUSY over an armed
        probe)."""
        self._text_write_guards.append(guard)

    def _code_written(self, addr: int, data: bytes) -> None:
        region = self.memory.region_of(addr)
        if region is not None and region.perms & mem.X:
            self.insn_starts.code_written(addr, data)

    def statistics(self) -> MachineStatistics:
        c = self._c
        counts = {f.name: getattr(c, f.name) for f in fields(MachineStatistics)
                  if not f.name.startswith("per_cpu")}
        counts["traps"] += sum(cpu.traps for cpu in self.cpus)   # breakpoint traps
        return MachineStatistics(
            **counts,
            per_cpu_instructions=tuple(cpu.instructions for cpu in self.cpus),
            per_cpu_tasks=tuple(cpu.tasks_run for cpu in self.cpus))

    @property
    def schedule(self) -> list[tuple[int, int]]:
        """The conductor's decisions so far, (cpu id, quantum) in order.  With its coins
        (`conductor.recording()`) it replays the run: `--replay TEXT`, or
        `conductor=replay_factory(parse_recording(text), policy)` and the same seed."""
        return self.conductor.schedule

    def trace_digest(self) -> str:
        """A hash of every event of the run, in order (the events the ring has dropped are
        in it too): blake2b-128 over each event's repr."""
        h = self._digest.copy()
        h.update(fold(self._trace))
        return h.hexdigest()

    @property
    def trace(self) -> list[tuple]:
        """The event trace: (kind, ...) tuples in the order they happened, the newest
        `trace_limit` of them (at least).  The fields of each kind, and their virtual
        timestamps, are listed in `_trace_export.EVENTS`."""
        tr = self._trace
        return tr if len(tr) <= self.trace_limit else tr[len(tr) - self.trace_limit:]

    def _compact_trace(self) -> None:
        """Fold the events beyond the newest `trace_limit` into the digest and drop them
        (the list object stays: the probe core appends to it directly)."""
        tr = self._trace
        drop = len(tr) - self.trace_limit
        self._digest.update(fold(tr[:drop]))      # each event's repr, in order (_tracefold)
        del tr[:drop]

    def trace_event(self, *event) -> None:
        self._trace.append(event)

    def now_ns(self) -> int:
        """Virtual time as host code sees it: the start of the latest quantum (or the latest
        wake-up the machine jumped to).  Host-side trace events are stamped with it."""
        return self._now

    def count_stray_trap(self) -> None:
        self._c.stray_traps += 1

    async def sleep_ns(self, ns: int) -> None:
        """Let the machine run for `ns` of virtual time (a host-side delay that replays)."""
        await self.call("msleep", max(0, ns) // NS_PER_MS or 0)

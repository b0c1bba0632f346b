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
from ._conductor import Conductor, make_conductor
from ._cpu import CPU
from .._errors import Oops, OopsRecord, RunawayError
from ._grace import GracePeriods
from ._hypercalls import NS_PER_MS, Hypercalls
from ._kernel import IMAGES, Image, Kallsyms
from ._modules import Module, Modules
from ._oops import Oopses
from ._sched import Scheduler, _Baton
from ._task import Task
from ._textpoke import TextPoke
from ._events import EventBus
from ._traps import TRAP_COST_NS, Traps, _no_handler


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


class _Counters:
    def __init__(self):
        for f in fields(MachineStatistics):
            if not f.name.startswith("per_cpu"):
                setattr(self, f.name, 0)



class SMPMachine(Scheduler, TextPoke, GracePeriods, Modules, Traps, Hypercalls, Oopses):
    """The machine, without the probe core: `smpkprobes.Machine` puts the two together.
    What kernel code beside it (the probe core) may use is `KernelServices` (`_services`)."""

    def __init__(self, arch: str = "x86_64", cpus: int = 4, seed: int = 0, preempt: bool = False,
                 kernel: str | Path | None = None, *, quantum: tuple[int, int] = (16, 4096),
                 call_budget: int = 20_000_000, preempt_prob: float = 0.25,
                 trap_delay: float = 1 / 16, ipi_delay: int = 2, text_sync: bool = True,
                 conductor=None):
        if cpus < 1:
            raise ValueError("a machine needs at least one CPU")
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
        self._trace: list[tuple] = []
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
        self._gp_begun = 0
        self._nursery: trio.Nursery | None = None
        # What the kernel code beside the machine (the probe core) registers; the machine
        # only calls it (see _traps, _grace).
        self._fault_fixup: Callable[[CPU, unicorn.UcError], bool] | None = None
        self._return_address_resolver: Callable[[CPU, int, int], tuple[int, int]] | None = None
        self._unquiescent_text: list[tuple[int, int]] = []
        self._rcu_tasks_text: list[tuple[int, int]] = []
        self.register_trap_handler(_no_handler)
        # Task exits, oopses, modules going, quanta: see _events.
        self.events = EventBus()

    # == lifecycle ======================================================================
    async def __aenter__(self):
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        for cpu in self.cpus:
            self._nursery.start_soon(self._cpu_main, cpu, name=f"smpkprobes-cpu{cpu.id}")
        self._batons[0].set()
        return self

    async def __aexit__(self, *exc):
        self._nursery.cancel_scope.cancel()
        return await self._nursery_cm.__aexit__(*exc)

    # == public API =====================================================================
    async def call(self, func, *args: int, cpu: int | None = None, comm: str | None = None) -> int:
        """Run guest function `func` as a new task; return its (sign-extended) result."""
        addr = self.resolve_function(func)
        if cpu is not None and not 0 <= cpu < self.ncpus:
            raise ValueError(f"no CPU {cpu} (machine has {self.ncpus})")
        name = comm or (func if isinstance(func, str) else self.format_addr(addr))
        task = Task(addr, tuple(int(a) for a in args), name[:15], cpu,
                    order_key=(addr, tuple(args), -1 if cpu is None else cpu, name))
        self._pending.append(task)
        self._idle_event.set()
        await task.done.wait()
        if task.oops is not None:
            cls = RunawayError if task.oops.cause.startswith("runaway") else Oops
            raise cls(task.oops)
        return task.result

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

    def resolve_function(self, func) -> int:
        if isinstance(func, int):
            return func
        addr = self.kallsyms_lookup_name(func)
        if not addr:
            raise KeyError(f"no such guest symbol: {func!r}")
        return addr

    def read_memory(self, addr: int, size: int) -> bytes:
        return self.memory.read(addr, size)

    def write_memory(self, addr: int, data: bytes) -> None:
        self.memory.write(addr, data)
        self._code_written(addr, data)

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
        h = hashlib.blake2b(digest_size=16)
        for ev in self._trace:
            h.update(repr(ev).encode())
        return h.hexdigest()

    @property
    def trace(self) -> list[tuple]:
        """The event trace: (kind, ...) tuples in the order they happened.  The fields of
        each kind, and their virtual timestamps, are listed in `_trace_export.EVENTS`."""
        return self._trace

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

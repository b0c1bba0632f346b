"""The simulated SMP machine: shared memory, CPUs as trio tasks, guest tasks, text patching
and grace periods.

How the CPUs take turns
-----------------------
Each CPU is a trio task, but only one of them runs guest code at a time: they pass a baton.
The holder asks the conductor (seeded) which CPU runs next and for how many instructions;
if that is itself it runs the quantum, otherwise it hands the baton over and sleeps.  So the
interleaving of guest instructions is decided by the seed alone.

Host code (the user's trio tasks calling `m.call`, `register_kprobe`, ...) only runs when the
baton holder lets it: whenever the machine has woken a host task, the holder waits until
every other trio task is blocked (`wait_all_tasks_blocked`) before deciding again.  New guest
tasks submitted in the same round are admitted in a sorted order, so trio's randomised
scheduling of host tasks cannot change the guest-visible run.

Time
----
Every CPU has a virtual clock: one ns per guest instruction.  A sleeping task wakes when the
CPUs' time passes its wake-up time; when every CPU is idle, time jumps to the next wake-up.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import trio
import trio.testing
import unicorn

from smpkprobes.cpus import get_backend

from . import _memory as mem
from ._blockbudget import InsnStarts
from ._conductor import Conductor, make_conductor
from ._cpu import CPU
from .._errors import OopsRecord
from ._kernel import IMAGES, Image, Kallsyms
from ._task import Task, TaskState

NS_PER_MS = 1_000_000
# Virtual cost of taking a trap or a hypercall inside a quantum, so that time read in a
# handler moves on between two traps of the same quantum.
TRAP_COST_NS = 50


class _Baton:
    """How one CPU task hands the machine to another: a wake-up with a single waiter.
    A trio.Event would do, but this is the machine's hottest path (most quanta end with a
    hand-over) and rescheduling the waiting task directly costs a fifth less."""

    __slots__ = ("_task", "_pending")

    def __init__(self):
        self._task = None
        self._pending = False

    def set(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)
        else:
            self._pending = True

    async def wait(self) -> None:
        if self._pending:
            self._pending = False
            await trio.lowlevel.checkpoint()
            return
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _raise_cancel):
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED


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


@dataclass
class Module:
    name: str
    image: Image
    text: tuple[int, int]
    init_text: tuple[int, int]
    data: tuple[int, int]
    init_freed: bool = False
    loaded: bool = True

    def in_text(self, addr: int) -> bool:
        return self.text[0] <= addr < self.text[1]

    def in_init(self, addr: int) -> bool:
        return self.init_text[0] <= addr < self.init_text[1]


class _Counters:
    def __init__(self):
        for f in fields(MachineStatistics):
            if not f.name.startswith("per_cpu"):
                setattr(self, f.name, 0)


class SMPMachine:
    """The machine without the probe core.  `smpkprobes.Machine` adds `kprobes` and
    `debugfs`."""

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
        self._trap_intno = self.backend.trap_intno
        self._trap_pc_offset = self.backend.trap_pc_offset
        self.task_return_addr = ksym("__hc_task_return")
        self.cpus = [CPU(i, self.backend, self.memory, self, (hc_start, hc_end),
                         ksym("__hc_call_return"), call_budget, self.insn_starts)
                     for i in range(cpus)]
        for cpu in self.cpus:
            cpu.pc = self.idle_addr
            cpu.initial_context = cpu.context_save()
            cpu._baton = _Baton()
            cpu._line = ""
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
        self._closing = False
        # Set by the probe core; the machine only calls them.
        self.trap_handler = None            # see the property
        self.fault_fixup: Callable[[CPU, unicorn.UcError], bool] | None = None
        self.return_address_resolver: Callable[[CPU, int, int], tuple[int, int]] | None = None
        self.task_exit_notifiers: list[Callable[[Task], None]] = []
        self.oops_notifiers: list[Callable[[CPU], None]] = []
        self.module_notifiers: list[Callable[[str, Module], None]] = []
        # Called after every quantum with the CPU that ran it (the invariant checks).
        self.quantum_notifiers: list[Callable[[CPU], None]] = []
        # Called when a task is switched in on a CPU (per-task debug registers follow it).
        self.sched_in_notifiers: list[Callable[[CPU, Task], None]] = []

    # == lifecycle ======================================================================
    async def __aenter__(self):
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        for cpu in self.cpus:
            self._nursery.start_soon(self._cpu_main, cpu, name=f"smpkprobes-cpu{cpu.id}")
        self.cpus[0]._baton.set()
        return self

    async def __aexit__(self, *exc):
        self._closing = True
        self._nursery.cancel_scope.cancel()
        return await self._nursery_cm.__aexit__(*exc)

    # == public API =====================================================================
    async def call(self, func, *args: int, cpu: int | None = None, comm: str | None = None) -> int:
        """Run guest function `func` as a new task; return its (sign-extended) result."""
        return await self.spawn(func, *args, cpu=cpu, comm=comm).wait()

    def spawn(self, func, *args: int, cpu: int | None = None, comm: str | None = None) -> Task:
        """Start guest function `func` as a new task and return it at once; `await
        task.wait()` gives its result (as `call` does)."""
        addr = self.resolve_function(func)
        if cpu is not None and not 0 <= cpu < self.ncpus:
            raise ValueError(f"no CPU {cpu} (machine has {self.ncpus})")
        name = comm or (func if isinstance(func, str) else self.format_addr(addr))
        task = Task(addr, tuple(int(a) for a in args), name[:15], cpu,
                    order_key=(addr, tuple(args), -1 if cpu is None else cpu, name))
        self._pending.append(task)
        self._idle_event.set()
        return task

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
        counts["traps"] += sum(cpu.traps for cpu in self.cpus)   # through breakpoint vectors
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

    def export_ftrace(self, out) -> None:
        """Write the event trace as ftrace-style text to `out` (a path or a text file)."""
        from ..tools._trace_export import export_ftrace
        export_ftrace(self, out)

    def export_perfetto(self, out) -> None:
        """Write the event trace as Chrome/Perfetto trace-event JSON (one track per CPU)."""
        from ..tools._trace_export import export_perfetto
        export_perfetto(self, out)

    def count_stray_trap(self) -> None:
        self._c.stray_traps += 1

    async def sleep_ns(self, ns: int) -> None:
        """Let the machine run for `ns` of virtual time (a host-side delay that replays)."""
        await self.call("msleep", max(0, ns) // NS_PER_MS or 0)

    # == text patching (KPROBES.md section 4) ============================================
    async def text_poke(self, addr: int, data: bytes) -> None:
        """Write kernel text and wait until every online CPU has dropped its stale
        translations of it (the IPI + sync_core of the kernel)."""
        await self.text_poke_batch([(addr, data)])

    async def text_poke_batch(self, patches: list[tuple[int, bytes]]) -> None:
        if not patches:
            return
        for addr, data in patches:
            self.memory.poke(addr, data)
            self._code_written(addr, data)
        self._c.text_syncs += 1
        sync = self._c.text_syncs
        self.trace_event("poke", tuple((a, d.hex()) for a, d in patches), sync, self._now)
        if not self.text_sync:
            return      # the "no cross-CPU sync" configuration: stale translations survive
        ranges = [(a, a + len(d)) for a, d in patches]
        remaining = set()
        for cpu in self.cpus:
            if not cpu.online:
                continue
            if cpu.current is None and not cpu.deferred_trap:
                for a, b in ranges:
                    cpu.flush_tb(a, b)
            else:
                delay = self.conductor.randint("ipi", 0, self.ipi_delay) if self.ipi_delay else 0
                cpu.pending_flush.append([ranges, delay])
                remaining.add(cpu.id)
        waiter = [remaining, trio.Event(), self._now]     # [2]: when the last CPU acked
        if remaining:
            self._sync_waiters.append(waiter)
            await waiter[1].wait()
        self.trace_event("synced", sync, waiter[2])

    def _deliver_ipis(self, cpu: CPU) -> None:
        keep = []
        for entry in cpu.pending_flush:
            ranges, delay = entry
            if delay > 0:
                entry[1] -= 1
                keep.append(entry)
                continue
            if callable(ranges):
                ranges(cpu)         # a cross-CPU function call (smp_call_function_many)
                continue
            for a, b in ranges:
                cpu.flush_tb(a, b)
        if len(keep) < len(cpu.pending_flush):
            self.trace_event("ipi", cpu.id, cpu.clock)
        cpu.pending_flush = keep
        if not keep:
            self._ack(self._sync_waiters, cpu.id, cpu.clock)

    def _deliver_idle_ipis(self) -> bool:
        """The whole machine is idle: every CPU takes its pending IPIs now.  An idle CPU runs
        no quanta to count an IPI's delay down in, so a CPU whose task ended before its
        flush was due would otherwise never acknowledge, and text_poke would wait forever."""
        late = [c for c in self.cpus if c.online and c.pending_flush]
        for cpu in late:
            for entry in cpu.pending_flush:
                entry[1] = 0
            self._deliver_ipis(cpu)
        return bool(late)

    def _ack(self, waiters: list[list], cpu_id: int, now: int) -> None:
        for w in waiters:
            w[0].discard(cpu_id)
        done = [w for w in waiters if not w[0]]
        if done:
            waiters[:] = [w for w in waiters if w[0]]
            for w in done:
                w[2] = now
                w[1].set()
            self._host_woken = True

    # == grace periods (KPROBES.md section 5) ===========================================
    def quiescent(self, cpu: CPU) -> bool:
        """Not in a probe handler, not between a trap and the end of its single-step, not in
        a boosted slot."""
        if cpu.current is None and not cpu.deferred_trap:
            return True
        return cpu.preemptible() and cpu.pc not in mem.SLOTS

    async def synchronize(self) -> None:
        """Wait for one grace period: every online CPU passes a quiescent state."""
        remaining = {c.id for c in self.cpus if c.online and not self.quiescent(c)}
        self._gp_begun += 1
        gp = self._gp_begun
        self.trace_event("gp_begin", gp, self._now)
        waiter = [remaining, trio.Event(), self._now]     # [2]: when the last CPU acked
        if remaining:
            self._gp_waiters.append(waiter)
            await waiter[1].wait()
        self._c.grace_periods += 1
        self.trace_event("gp", self._c.grace_periods, gp, waiter[2])

    # == modules ==========================================================================
    async def load_module(self, name: str) -> Module:
        if name in self.modules:
            raise ValueError(f"module {name} is already loaded")
        image = Image.load(IMAGES / self.arch / f"{name}.ko", module=name)
        self._load_image(image)
        sec = image.sections
        text = sec.get(".text", (mem.MODULE_TEXT.start, 0))
        init = sec.get(".init.text", (0, 0))
        data = (mem.MODULE_DATA.start, mem.MODULE_DATA.size)
        module = Module(name, image, (text[0], text[0] + text[1]), (init[0], init[0] + init[1]),
                        data)
        self.kallsyms.add(image.symbols)
        self.modules[name] = module
        await self.text_poke_batch([(text[0], self.memory.peek(text[0], text[1]))])
        init_fn = next((s for s in image.symbols if s.is_func and module.in_init(s.addr)
                        and s.name.endswith("_init")), None)
        if init_fn is not None:
            await self.call(init_fn.addr, comm=f"insmod")
        # Free the init text, as the kernel does after a successful init.
        for notify in list(self.module_notifiers):
            notify("init_freed", module)
        module.init_freed = True
        if init[1]:
            self.memory.fill(init[0], init[1], 0)
            await self.text_poke_batch([(init[0], bytes(init[1]))])
        return module

    async def unload_module(self, module: Module) -> None:
        if self.modules.get(module.name) is not module:
            raise ValueError(f"module {module.name} is not loaded")
        for notify in list(self.module_notifiers):
            notify("unload", module)
        del self.modules[module.name]
        module.loaded = False
        self.kallsyms.remove_module(module.name)
        size = module.text[1] - module.text[0]
        await self.text_poke_batch([(module.text[0], bytes(size))])
        self.memory.fill(module.data[0], module.data[1] - module.data[0], 0)

    def module_of(self, addr: int) -> Module | None:
        for m in self.modules.values():
            if m.in_text(addr) or m.in_init(addr):
                return m
        return None

    def _load_image(self, image: Image) -> None:
        for addr, data, memsz in image.segments:
            self.memory.write(addr, data)
            self._code_written(addr, data)
            if memsz > len(data):
                self.memory.fill(addr + len(data), memsz - len(data), 0)

    def _required_symbol(self, name: str) -> int:
        s = self.kallsyms.lookup(name)
        if s is None:
            raise RuntimeError(f"kernel image {self.kernel.path} lacks required symbol {name}")
        return s.addr

    # == the conductor loop ==============================================================
    async def _cpu_main(self, me: CPU) -> None:
        while True:
            await me._baton.wait()
            await self._conduct(me)

    async def _conduct(self, me: CPU) -> None:
        """Run quanta while the conductor picks `me`; hand the baton on when it doesn't."""
        while True:
            if self._decision is None:
                if self._host_woken:
                    self._host_woken = False
                    self._settled = True
                    await trio.testing.wait_all_tasks_blocked()
                    continue
                if self._pending:
                    self._admit()
                if self._sleepers:
                    self._wake_sleepers()
                runnable = [c for c in self.cpus if c.online and (
                    c.current is not None or c.deferred_trap or self._has_work(c))]
                if not runnable:
                    if self._sleepers:
                        if not self._settled:
                            # Host tasks a handler woke (a trio Event set inside a probe)
                            # get their turn before virtual time leaps forward.
                            self._host_woken = True
                            continue
                        self._jump_to_next_wake()
                        continue
                    if self._deliver_idle_ipis():
                        continue
                    self._idle_event = trio.Event()
                    if self._pending:
                        continue
                    await self._idle_event.wait()
                    self._host_woken = True
                    continue
                self._decision = self.conductor.pick(runnable)
            cpu, q = self._decision
            if cpu is not me:
                cpu._baton.set()
                return
            self._decision = None
            self._settled = False
            self._run_quantum(me, q)
            # Let trio deliver cancellation without giving host tasks a turn.
            if self._c.quanta % 256 == 0:
                await trio.lowlevel.checkpoint_if_cancelled()

    def _has_work(self, cpu: CPU) -> bool:
        if cpu.current is not None or cpu.deferred_trap:
            return True
        return any(t.allowed_on(cpu.id) for t in self._runq)

    def _admit(self) -> None:
        if not self._pending:
            return
        batch = sorted(self._pending, key=lambda t: t.order_key)
        self._pending.clear()
        for task in batch:
            task.pid = self._next_pid
            self._next_pid += 1
            if not self._free_stacks:
                raise RuntimeError("out of guest task stacks")
            idx = heapq.heappop(self._free_stacks)
            task.stack_base = mem.STACKS.start + idx * mem.STACK_SIZE
            task.stack_top = task.stack_base + mem.STACK_SIZE
            task.state = TaskState.RUNNABLE
            task.ready_at = self._now
            self._runq.append(task)
            self._c.tasks += 1
            self.trace_event("new", task.pid, task.comm, task.func, task.args, task.affinity,
                             self._now)

    def _wake_sleepers(self) -> None:
        if not self._sleepers:
            return
        busy = [c.clock for c in self.cpus if c.current is not None]
        now = min(busy) if busy else self._now
        while self._sleepers and self._sleepers[0][0] <= now:
            wake_at, _, task = heapq.heappop(self._sleepers)
            self._make_runnable(task, wake_at)

    def _jump_to_next_wake(self) -> None:
        wake_at, _, task = heapq.heappop(self._sleepers)
        self._now = max(self._now, wake_at)
        self._make_runnable(task, wake_at)

    def _make_runnable(self, task: Task, at: int) -> None:
        task.state = TaskState.RUNNABLE
        task.ready_at = at
        self._runq.append(task)
        self.trace_event("wake", task.pid, at)

    def _pick_task(self, cpu: CPU) -> Task | None:
        for i, t in enumerate(self._runq):
            if t.allowed_on(cpu.id):
                del self._runq[i]
                return t
        return None

    def _switch_in(self, cpu: CPU, task: Task) -> None:
        cpu.clock = max(cpu.clock, task.ready_at)
        if task.context is None:
            cpu.context_restore(cpu.initial_context)
            self.backend.cc.setup_call(cpu, task.stack_top, task.func, task.args,
                                       self.task_return_addr)
            cpu.tasks_run += 1
        else:
            cpu.context_restore(task.context)
            task.context = None
        if task.last_cpu is not None and task.last_cpu != cpu.id:
            task.migrations += 1
            self._c.migrations += 1
        task.last_cpu = cpu.id
        task.state = TaskState.RUNNING
        cpu.current = task
        for notify in self.sched_in_notifiers:
            notify(cpu, task)
        self._c.context_switches += 1
        self.trace_event("run", cpu.id, task.pid, cpu.clock)

    def _run_quantum(self, cpu: CPU, q: int) -> None:
        # (The hot loop of the machine: once per quantum, so kept free of needless calls.)
        if cpu.clock > self._now:
            self._now = cpu.clock
        if cpu.pending_flush:
            self._deliver_ipis(cpu)
        if cpu.current is None and not cpu.deferred_trap:
            task = self._pick_task(cpu)
            if task is None:
                return
            self._switch_in(cpu, task)
        task = cpu.current
        c = self._c
        cpu.intra = 0
        c.quanta += 1
        cpu.quanta += 1
        self._trace.append(("q", cpu.id, task.pid if task else 0, q, cpu.clock))
        if cpu.deferred_trap:
            cpu.deferred_trap = False
            cpu.stop_requested = False
            self._dispatch_trap(cpu, cpu.deferred_addr)
        err = None
        if cpu.current is not None:
            err = cpu.run(q)
        # Traps inside the quantum advanced now_ns() by TRAP_COST_NS each; never let the
        # clock run backwards when they add up to more than the quantum.
        cpu.clock += q if q >= cpu.intra else cpu.intra
        cpu.instructions += q
        c.instructions += q
        if err is not None and cpu.current is not None:
            self._on_fault(cpu, err)
        task = cpu.current
        if task is not None:
            task.instructions += q
            # With preemption disabled the budget doubles, then it is a hard lockup (a
            # leaked preempt count must not make a runaway guest run for ever).
            if task.instructions > self.call_budget and (
                    cpu.preempt_count == 0 or task.instructions > 2 * self.call_budget):
                atomic = " with preemption disabled" if cpu.preempt_count else ""
                self.kill_current(cpu, f"runaway: instruction budget of {self.call_budget} "
                                       f"exhausted (a guest infinite loop?{atomic})")
            elif self.preempt and cpu.preemptible() and cpu.pc not in mem.SLOTS \
                    and self.conductor.chance("preempt", self.preempt_prob):
                self._c.preemptions += 1
                task.context = cpu.context_save()
                cpu.current = None
                cpu.pc = self.idle_addr
                self._make_runnable(task, cpu.clock)
        if self._gp_waiters:
            if self.quiescent(cpu):
                self._ack(self._gp_waiters, cpu.id, cpu.clock)
            if self._gp_waiters:
                for other in self.cpus:
                    if other.current is None and not other.deferred_trap:
                        self._ack(self._gp_waiters, other.id, cpu.clock)
        for notify in self.quantum_notifiers:
            notify(cpu)

    # == CpuHost: what the CPUs call back into ===========================================
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
        if self.backend.handle_arch_trap(cpu, intno):
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

    # == hypercalls ======================================================================
    def _ret(self, cpu: CPU, value: int | None) -> None:
        self.backend.cc.emulate_return(cpu, value)

    def _hc_console_write(self, cpu: CPU) -> None:
        cc = self.backend.cc
        buf, n = cc.arg(cpu, 0), cc.arg(cpu, 1)
        text = cpu._line + self.memory.read(buf, n).decode("latin-1")
        *lines, cpu._line = text.split("\n")
        self.printk_log.extend(lines)
        for line in lines:
            self.trace_event("printk", cpu.id, line, cpu.clock + cpu.intra)
        self._ret(cpu, n)

    def _hc_ktime_get_ns(self, cpu: CPU) -> None:
        self._ret(cpu, cpu.now_ns())

    def _blocking(self, cpu: CPU, what: str) -> None:
        if cpu.nesting or cpu.preempt_count:
            raise RuntimeError(f"BUG: scheduling while atomic: {what} called with "
                               f"preemption disabled (from a probe handler?)")

    def _hc_msleep(self, cpu: CPU) -> None:
        self._blocking(cpu, "msleep")
        ms = self.backend.cc.arg(cpu, 0)
        self._ret(cpu, 0)
        task = self._switch_out(cpu)
        task.state = TaskState.SLEEPING
        task.wake_at = cpu.now_ns() + ms * NS_PER_MS
        self._seq += 1
        heapq.heappush(self._sleepers, (task.wake_at, self._seq, task))
        self.trace_event("sleep", cpu.id, task.pid, task.wake_at, cpu.clock + cpu.intra)

    def _hc_schedule(self, cpu: CPU) -> None:
        self._blocking(cpu, "schedule")
        self._ret(cpu, 0)
        task = self._switch_out(cpu)
        self._make_runnable(task, cpu.now_ns())

    def _hc_do_exit(self, cpu: CPU) -> None:
        self._blocking(cpu, "do_exit")
        code = self.backend.sign_extend(self.backend.cc.arg(cpu, 0))
        self._finish(cpu, code)

    def _hc_task_return(self, cpu: CPU) -> None:
        self._finish(cpu, self.backend.sign_extend(cpu.reg_read(self.backend.cc.ret_reg)))

    def _hc_call_return(self, cpu: CPU) -> None:
        cpu.stop_requested = True

    def _switch_out(self, cpu: CPU) -> Task:
        task = cpu.current
        task.context = cpu.context_save()
        cpu.current = None
        cpu.pc = self.idle_addr
        return task

    def _finish(self, cpu: CPU, result: int | None, oops: OopsRecord | None = None) -> None:
        task = cpu.current
        cpu.current = None
        cpu.pc = self.idle_addr
        # The rest of the quantum is idle time: charged, not emulated.
        cpu.stop_requested = True
        task.state = TaskState.DEAD
        task.result = result
        task.oops = oops
        for notify in list(self.task_exit_notifiers):
            notify(task)
        heapq.heappush(self._free_stacks, (task.stack_base - mem.STACKS.start) // mem.STACK_SIZE)
        self.trace_event("exit", cpu.id, task.pid, result if oops is None else "oops",
                         cpu.clock + cpu.intra)
        task.done.set()
        self._host_woken = True

    # == oopses ===========================================================================
    def _on_fault(self, cpu: CPU, err: unicorn.UcError) -> None:
        if self.fault_fixup is not None:
            try:
                if self.fault_fixup(cpu, err):
                    return
            except BaseException as exc:
                self.on_hook_exception(cpu, exc)
                return
        self.kill_current(cpu, f"guest fault: {err}")

    def kill_current(self, cpu: CPU, cause: str) -> None:
        """Kill the task running on `cpu` with an oops; the machine and the other CPUs go
        on."""
        task = cpu.current
        if task is None:
            return
        record = self._oops_record(cpu, task, cause)
        self.oopses.append(record)
        self._c.oopses += 1
        self.printk_log.extend(record.report.splitlines())
        for notify in list(self.oops_notifiers):
            notify(cpu)
        cpu.preempt_count = 0
        cpu.deferred_trap = False
        self._finish(cpu, None, record)
        cpu.stop_requested = True

    def _oops_record(self, cpu: CPU, task: Task, cause: str) -> OopsRecord:
        b = self.backend
        ip = cpu.pc
        regs = tuple((name, cpu.reg_read(name)) for name in b.registers)
        try:
            trace = cpu.regs().stack_trace()[1:]
        except Exception:         # a corrupt stack must not hide the oops itself
            trace = []
        call_trace = tuple(self.format_addr(a) for a in trace)
        w = b.bits // 4
        lines = [f"Oops: {cause}",
                 f"CPU: {cpu.id} PID: {task.pid} Comm: {task.comm}",
                 f"{b.cc.pc_reg.upper()}: {self.format_addr(ip)} ({ip:#0{w + 2}x})"]
        row = []
        for name, val in regs:
            row.append(f"{name.upper()}: {val:0{w}x}")
            if len(row) == 3:
                lines.append(" ".join(row))
                row = []
        if row:
            lines.append(" ".join(row))
        lines.append("Call Trace:")
        lines.extend(f" {c}" for c in call_trace)
        return OopsRecord(task.pid, task.comm, cpu.id, ip, self.format_addr(ip), cause, regs,
                          call_trace, "\n".join(lines))

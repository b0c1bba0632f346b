"""The conductor loop and the run queue: which CPU runs next, for how long, and which task.
A mixin of `SMPMachine`.

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

import heapq
from typing import TYPE_CHECKING

import trio
import trio.testing

from . import _memory as mem
from ._events import QuantumEnded, TaskExited, TaskScheduledIn
from ._task import Task, TaskState
from .._errors import OopsRecord

if TYPE_CHECKING:    # pragma: no cover
    from ._cpu import CPU


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



# Quanta in a row made of breakpoint retries alone before the soft-lockup oops
# (Scheduler._watch_soft_lockup).
SOFT_LOCKUP_QUANTA = 16


class Scheduler:
    """The scheduler part of `SMPMachine` (see `_machine`)."""

    async def _cpu_main(self, me: CPU) -> None:
        try:
            while True:
                await self._batons[me.id].wait()
                await self._conduct(me)
        except Exception as exc:
            # A bug of the machine itself (the guest's faults and the handlers' exceptions
            # are oopses, not exceptions here).  The nursery cancels the other CPUs, but a
            # host task shielded from cancellation (an unregistration waiting for its text
            # sync) would wait for ever for CPUs that are gone: panic wakes it.
            self.panic(f"CPU {me.id} crashed: {type(exc).__name__}: {exc}")
            raise

    async def _conduct(self, me: CPU) -> None:
        """Run quanta while the conductor picks `me`; hand the baton on when it doesn't."""
        while True:
            if self._decision is None:
                if self._host_woken:
                    self._host_woken = False
                    self._settled = True
                    await trio.testing.wait_all_tasks_blocked()
                    continue
                if self._host_requests:
                    self._grant_host_turn()
                    continue
                if self._kill_requests:
                    self._reap_killed()
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
                self._batons[cpu.id].set()
                return
            self._decision = None
            self._settled = False
            self._run_quantum(me, q)
            # A checkpoint between quanta (every 16th: one costs about a quantum's worth
            # of host time), so that trio's deadlines fire while CPUs run.  A host task it
            # lets run acts at this quantum boundary, before the next decision; only tasks
            # woken from outside the machine (a deadline, wall-clock time) can be ready
            # here, and their registrations wait for their turn (`host_turn`).  A cancel
            # made inside a handler needs no checkpoint (see `_calls`).
            if not self._c.quanta & 15:
                await trio.lowlevel.checkpoint()

    def _has_work(self, cpu: CPU) -> bool:
        if cpu.current is not None or cpu.deferred_trap:
            return True
        return any(t.allowed_on(cpu.id) for t in self._runq)

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
        if self.events.wants(TaskScheduledIn):
            self.events.publish(TaskScheduledIn(cpu, task))
        self._c.context_switches += 1
        self.trace_event("run", cpu.id, task.pid, cpu.clock)

    def _watch_soft_lockup(self, cpu: CPU, ran: int) -> None:
        """The soft-lockup watchdog.  A breakpoint whose handling asks to resume at that
        same breakpoint (a pre_handler returning 1 with regs.ip unmoved; a broken probe
        core) traps again at once, for ever: each retry charges one instruction, so the
        call budget would end it only after some 10^7 traps, minutes of host time.  A
        quantum at least half of whose instructions were such retries made no progress;
        SOFT_LOCKUP_QUANTA of those in a row kill the task with an oops (in Linux, the
        watchdog's "BUG: soft lockup").  Costs nothing until a retry happens."""
        retraps, cpu.retraps = cpu.retraps, 0
        if retraps and 2 * retraps >= ran:
            cpu.stalled_quanta += 1
        else:
            cpu.stalled_quanta = 0
            return
        if cpu.stalled_quanta >= SOFT_LOCKUP_QUANTA:
            cpu.stalled_quanta = 0
            self.kill_current(
                cpu, f"soft lockup: CPU#{cpu.id} stuck re-trapping at "
                     f"{self.format_addr(cpu.retrap_addr)} for {SOFT_LOCKUP_QUANTA} quanta "
                     f"(a handler resumed at the breakpoint it hit: a pre_handler that "
                     f"returns 1 must move regs.ip)")

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
        executed = cpu.executed
        if cpu.deferred_trap:
            self._dispatch_deferred_trap(cpu)
        err = None
        if cpu.current is not None:
            err = cpu.run(q)
        # What ran: the budget rounded up to a block, or less when the quantum was cut
        # short (a trap, a hypercall, the task's end), plus calls made from handlers.
        ran = cpu.executed - executed
        # Traps inside the quantum advanced now_ns() by TRAP_COST_NS each; never let the
        # clock run backwards when they add up to more than what ran.
        cpu.clock += ran if ran >= cpu.intra else cpu.intra
        cpu.instructions += ran
        c.instructions += ran
        if err is not None and cpu.current is not None:
            self._on_fault(cpu, err)
        if cpu.retraps or cpu.stalled_quanta:
            self._watch_soft_lockup(cpu, ran)
        task = cpu.current
        if task is not None:
            task.instructions += ran
            # With preemption disabled the budget doubles, then it is a hard lockup (a
            # leaked preempt count must not make a runaway guest run for ever).
            if task.instructions > self.call_budget and (
                    cpu.preempt_count == 0 or task.instructions > 2 * self.call_budget):
                atomic = " with preemption disabled" if cpu.preempt_count else ""
                self.kill_current(cpu, f"runaway: instruction budget of {self.call_budget} "
                                       f"exhausted (a guest infinite loop?{atomic})")
            elif self.preempt and cpu.preemptible() and not self._in_unquiescent_text(cpu) \
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
        if self.events.wants(QuantumEnded):
            self.events.publish(QuantumEnded(cpu))
        if len(self._trace) > self._trace_high:
            self._compact_trace()


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
        # The rest of the quantum is idle time: neither run nor charged.
        cpu.stop_requested = True
        task.state = TaskState.DEAD
        task.result = result
        task.oops = oops
        self.events.publish(TaskExited(task))
        heapq.heappush(self._free_stacks, (task.stack_base - mem.STACKS.start) // mem.STACK_SIZE)
        self.trace_event("exit", cpu.id, task.pid, result if oops is None else "oops",
                         cpu.clock + cpu.intra)
        task.done.set()
        self._release_waiter(task)
        self._host_woken = True

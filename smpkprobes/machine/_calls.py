"""Guest calls from the host (`Machine.call`): checked before they start, bounded by the pool
of task stacks, cancellable.  A mixin of `SMPMachine`.

  * Checked first: the machine must be running (inside `async with`), the function must be
    a known symbol or an address that fits a machine word, every argument an integer that
    fits a word, and all of them must fit on a task stack.  Each failure is a TypeError,
    ValueError or RuntimeError before anything happens in the machine.
  * Task stacks are a pool: a call admitted while every stack is taken waits (in the
    seeded admission order) until a task exits and frees one.
  * Cancelling `m.call` kills its guest task the way do_exit would: at the next quantum
    boundary where the task is not inside a probe (preemptible, not in a slot), it exits;
    its stack and its kretprobe instances are freed (the exit notifiers), and only then does
    the cancelled `m.call` return.  The kill is requested from trio's abort callback, which
    runs synchronously when the cancel happens, so a cancel made inside a handler lands at
    the same point of every run with the same seed.
"""

from __future__ import annotations

import heapq
import functools
import operator
import outcome
import trio

from . import _memory as mem
from .._errors import Oops, RunawayError, UnknownSymbolError
from ._events import TaskExited
from ._task import Task, TaskState

# At most this share of a task stack may hold stack-passed arguments.
_ARG_STACK_SHARE = 4


class GuestCalls:
    """The guest-call part of `SMPMachine` (see `_machine`)."""

    def _init_calls(self) -> None:
        self._kill_requests: list[Task] = []

    # -- the public call ------------------------------------------------------------------
    async def call(self, func, *args: int, cpu: int | None = None, comm: str | None = None) -> int:
        """Run guest function `func` as a new task; return its (sign-extended) result."""
        return await self._result_of(self._new_task("m.call", func, args, cpu, comm))

    def spawn(self, func, *args: int, cpu: int | None = None, comm: str | None = None) -> Task:
        """Start guest function `func` as a new task and return it at once; `await
        task.wait()` gives its result, as `call` would (and cancelling that wait kills the
        task, as cancelling `call` does)."""
        task = self._new_task("m.spawn", func, args, cpu, comm)
        task.wait = functools.partial(self._result_of, task)
        return task

    async def _result_of(self, task: Task) -> int:
        await self._wait_task(task)
        if task.oops is not None:
            cls = RunawayError if task.oops.cause.startswith("runaway") else Oops
            raise cls(task.oops)
        return task.result

    def _new_task(self, what: str, func, args: tuple, cpu, comm) -> Task:
        self._check_running(what)
        addr = self.resolve_function(func)
        words = self._call_arguments(func, args)
        if cpu is not None and (not isinstance(cpu, int) or not 0 <= cpu < self.ncpus):
            raise ValueError(f"no CPU {cpu!r} (machine has {self.ncpus})")
        name = comm or (func if isinstance(func, str) else self.format_addr(addr))
        task = Task(addr, words, name[:15], cpu,
                    order_key=(addr, words, -1 if cpu is None else cpu, name))
        self._pending.append(task)
        self._idle_event.set()
        return task

    def _check_running(self, what: str) -> None:
        nursery = self._nursery
        if nursery is None or nursery.cancel_scope.cancel_called:
            raise RuntimeError(f"{what} needs the running machine: use it inside "
                               f"`async with Machine(...) as m:`")

    def resolve_function(self, func) -> int:
        """A guest function's address: a symbol name, or an address that fits a word."""
        if isinstance(func, str):
            addr = self.kallsyms_lookup_name(func)
            if not addr:
                raise UnknownSymbolError(f"no such guest symbol: {func!r}")
            return addr
        try:
            addr = operator.index(func)
        except TypeError:
            raise TypeError(f"a guest function is a symbol name or an address, not "
                            f"{type(func).__name__}") from None
        if not 0 <= addr <= self.backend.word_mask:
            raise ValueError(f"address {addr:#x} does not fit a {self.backend.bits}-bit word")
        return addr

    def _call_arguments(self, func, args: tuple) -> tuple[int, ...]:
        b = self.backend
        bits = b.bits
        limit = len(b.cc.arg_regs) + mem.STACK_SIZE // _ARG_STACK_SHARE // b.word_bytes
        if len(args) > limit:
            raise ValueError(f"too many arguments ({len(args)}) for a guest call: at most "
                             f"{limit} fit a task stack")
        words = []
        for i, a in enumerate(args):
            try:
                v = operator.index(a)
            except TypeError:
                raise TypeError(f"argument {i} of {func!r} must be an int, not "
                                f"{type(a).__name__} {a!r}") from None
            if not -(1 << (bits - 1)) <= v < (1 << bits):
                raise ValueError(f"argument {i} of {func!r} ({v}) does not fit a {bits}-bit "
                                 f"word")
            words.append(v)
        return tuple(words)

    # -- waiting, and cancellation -----------------------------------------------------------
    async def _wait_task(self, task: Task) -> None:
        """Wait until `task` is dead.  Cancelled, it kills the task first (see above)."""
        if task.state is TaskState.DEAD:
            await trio.lowlevel.checkpoint()
            return
        task.waiter = trio.lowlevel.current_task()

        def abort(raise_cancel):
            task.raise_cancel = raise_cancel
            if self._nursery.cancel_scope.cancel_called:
                task.waiter = None                    # the machine itself is going away
                return trio.lowlevel.Abort.SUCCEEDED
            if task.state is TaskState.NEW:           # not admitted yet: nothing ran
                self._pending.remove(task)
                task.state = TaskState.DEAD
                task.waiter = None
                return trio.lowlevel.Abort.SUCCEEDED
            self._kill_requests.append(task)
            self._idle_event.set()
            return trio.lowlevel.Abort.FAILED
        await trio.lowlevel.wait_task_rescheduled(abort)

    def _release_waiter(self, task: Task) -> None:
        """`task` died: the host task waiting for it goes on (or raises its cancellation)."""
        waiter, task.waiter = task.waiter, None
        if waiter is not None:
            cancel = task.raise_cancel
            trio.lowlevel.reschedule(waiter, outcome.capture(cancel) if cancel is not None
                                     else outcome.Value(None))

    def _reap_killed(self) -> None:
        """At a quantum boundary: kill the tasks whose m.call was cancelled, where it is
        safe (not inside a probe); the others are tried again at the next boundary."""
        keep = []
        # (By pid: trio aborts the tasks of a cancelled scope in an order of its own.)
        for task in sorted(self._kill_requests, key=lambda t: t.pid):
            state = task.state
            if state is TaskState.DEAD:
                continue
            if state is TaskState.RUNNING:
                cpu = next(c for c in self.cpus if c.current is task)
                if not cpu.preemptible() or cpu.deferred_trap or \
                        self._in_unquiescent_text(cpu):
                    keep.append(task)
                    continue
                self._finish(cpu, None)
                continue
            if state is TaskState.RUNNABLE:
                self._runq.remove(task)
            elif state is TaskState.SLEEPING:
                self._sleepers = [s for s in self._sleepers if s[2] is not task]
                heapq.heapify(self._sleepers)
            self._exit_off_cpu(task)
        self._kill_requests = keep

    def _exit_off_cpu(self, task: Task) -> None:
        task.state = TaskState.DEAD
        task.result = None
        self.events.publish(TaskExited(task))
        heapq.heappush(self._free_stacks, (task.stack_base - mem.STACKS.start) // mem.STACK_SIZE)
        self.trace_event("exit", task.last_cpu or 0, task.pid, None, self._now)
        task.done.set()
        self._release_waiter(task)
        self._host_woken = True

    def _admit(self) -> None:
        """New tasks get a pid and a stack in a sorted order (trio's scheduling of host tasks
        must not show); those that find no free stack wait, in that order, for the next
        task to exit."""
        if not self._pending or not self._free_stacks:
            return
        batch = sorted(self._pending, key=lambda t: t.order_key)
        admit, wait = batch[:len(self._free_stacks)], batch[len(self._free_stacks):]
        self._pending[:] = wait
        for task in admit:
            task.pid = self._next_pid
            self._next_pid += 1
            idx = heapq.heappop(self._free_stacks)
            task.stack_base = mem.STACKS.start + idx * mem.STACK_SIZE
            task.stack_top = task.stack_base + mem.STACK_SIZE
            task.state = TaskState.RUNNABLE
            task.ready_at = self._now
            self._runq.append(task)
            self._c.tasks += 1
            self.trace_event("new", task.pid, task.comm, task.func, task.args, task.affinity,
                             self._now)

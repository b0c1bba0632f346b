"""Guest tasks: one per `Machine.call`, with a pid, a comm, a stack and a saved context."""

from __future__ import annotations

import enum

import trio



class TaskState(enum.Enum):
    NEW = "new"
    RUNNABLE = "runnable"
    RUNNING = "running"
    SLEEPING = "sleeping"
    DEAD = "dead"


class Task:
    """A guest task."""

    def __init__(self, func: int, args: tuple[int, ...], comm: str, affinity: int | None,
                 order_key: tuple):
        self.pid = 0
        self.comm = comm
        self.func = func
        self.args = args
        self.affinity = affinity
        self.order_key = order_key
        self.state = TaskState.NEW
        self.context = None
        self.stack_base = 0
        self.stack_top = 0
        self.ready_at = 0
        self.wake_at = 0
        self.instructions = 0
        self.last_cpu: int | None = None
        self.migrations = 0
        self.result: int | None = None
        self.oops = None
        self.done = trio.Event()
        self.waiter = None             # the host trio task in m.call, waiting for the result
        self.raise_cancel = None       # set when that m.call was cancelled (see _calls)
        self.hw_breakpoints: list = []      # per-task hardware breakpoints (follow the task)

    def allowed_on(self, cpu_id: int) -> bool:
        return self.affinity is None or self.affinity == cpu_id

    def __repr__(self) -> str:
        return f"<task {self.comm}-{self.pid} {self.state.value}>"

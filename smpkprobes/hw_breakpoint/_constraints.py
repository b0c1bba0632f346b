"""The per-CPU slot constraint table of kernel/events/hw_breakpoint.c.

Debug registers are per CPU and few.  A breakpoint bound to a CPU (one member of a wide
breakpoint) takes a slot on that CPU for as long as it exists; a per-task breakpoint takes a
slot on whichever CPU its task runs, so it needs one free on every CPU.  The table counts,
per slot pool: `cpu_pinned[cpu]`, the CPU-bound breakpoints on each CPU, and `task_pinned`,
each task's breakpoints.  A new breakpoint fits on a CPU when

    cpu_pinned[cpu] + (the busiest task's count, or this task's) + 1 <= slots

on every CPU it may run on; else ENOSPC.  Checking and reserving happen in one step with no
await between them, so registrations from concurrent host tasks are counted exactly (the
kernel holds nr_bp_mutex for the same reason).
"""

from __future__ import annotations

import errno as E

from .._errors import KprobeError


class SlotConstraints:
    def __init__(self, ncpus: int, facts):
        self._facts = facts
        pools = [p for p, _ in facts.slots]
        self.cpu_pinned: dict[str, list[int]] = {p: [0] * ncpus for p in pools}
        # pool -> {task: count}; a dict keeps insertion order, so iteration is deterministic.
        self.task_pinned: dict[str, dict[object, int]] = {p: {} for p in pools}

    def _busy(self, pool: str, cpu: int, task) -> int:
        tasks = self.task_pinned[pool]
        if task is None:
            return self.cpu_pinned[pool][cpu] + max(tasks.values(), default=0)
        return self.cpu_pinned[pool][cpu] + tasks.get(task, 0)

    def reserve(self, pool: str, cpus: list[int], task=None) -> None:
        """Take a slot for a breakpoint on each of `cpus` (CPU-bound, task None) or for
        `task` on all of them; ENOSPC, and nothing taken, if one CPU is full."""
        n = self._facts.nr_slots(pool)
        for cpu in cpus:
            busy = self._busy(pool, cpu, task)
            if busy + 1 > n:
                raise KprobeError(E.ENOSPC, f"no {pool} breakpoint slot left on CPU {cpu} "
                                            f"({busy} of {n} in use)")
        if task is None:
            for cpu in cpus:
                self.cpu_pinned[pool][cpu] += 1
        else:
            tasks = self.task_pinned[pool]
            tasks[task] = tasks.get(task, 0) + 1

    def release(self, pool: str, cpus: list[int], task=None) -> None:
        if task is None:
            for cpu in cpus:
                self.cpu_pinned[pool][cpu] -= 1
        else:
            tasks = self.task_pinned[pool]
            tasks[task] -= 1
            if not tasks[task]:
                del tasks[task]

    def in_use(self, pool: str, cpu: int) -> int:
        """Slots reserved on `cpu` in the worst case: its CPU-bound ones and the busiest
        task's."""
        return self._busy(pool, cpu, None)

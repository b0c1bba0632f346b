"""Cross-CPU function calls: the machine's smp_call_function_many.

A CPU that is running a task takes the call as an IPI at the start of one of its next quanta,
0 to `ipi_delay` quanta late (a seeded coin, the same late-delivery window as text_poke's
sync); an idle CPU runs no guest code, so it takes the call at once.  The caller waits until
every CPU has run it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import trio

if TYPE_CHECKING:    # pragma: no cover
    from ._cpu import CPU
    from ._machine import SMPMachine


async def smp_call_function_many(machine: "SMPMachine", cpus: Iterable["CPU"],
                                 func: Callable[["CPU"], None]) -> None:
    """Run `func(cpu)` on each online CPU of `cpus`, on that CPU; return when all have."""
    remaining = set()
    for cpu in cpus:
        if not cpu.online:
            continue
        if cpu.current is None and not cpu.deferred_trap:
            func(cpu)
            continue
        delay = machine.conductor.randint("ipi", 0, machine.ipi_delay) if machine.ipi_delay else 0
        cpu.pending_flush.append([func, delay])
        remaining.add(cpu.id)
    if remaining:
        waiter = [remaining, trio.Event(), machine.now_ns()]
        machine._sync_waiters.append(waiter)
        await waiter[1].wait()

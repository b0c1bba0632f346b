"""Text patching (KPROBES.md section 4): text_poke writes kernel text, then every online CPU
drops its stale translations of it, an IPI each (delivered after a seeded delay).  A mixin of
`SMPMachine`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ._events import TextWritten

if TYPE_CHECKING:    # pragma: no cover
    from ._cpu import CPU


class TextPoke:
    """The text patching part of `SMPMachine` (see `_machine`)."""

    async def text_poke(self, addr: int, data: bytes) -> None:
        """Write kernel text and wait until every online CPU has dropped its stale
        translations of it (the IPI + sync_core of the kernel).  The text write guards
        may refuse it (the probe core: EBUSY over an armed probe)."""
        data = bytes(data)
        self.memory.read(addr, len(data))           # a clear error if it is not mapped
        for guard in self._text_write_guards:
            guard(addr, len(data))
        await self.text_poke_batch([(addr, data)])

    async def text_poke_batch(self, patches: list[tuple[int, bytes]]) -> None:
        if not patches:
            return
        await self.text_poke_finish(*self.text_poke_start(patches))

    async def text_poke_finish(self, sync: int | None, pending) -> None:
        """Wait for the IPIs `text_poke_start` sent."""
        if sync is None:
            return
        remaining = {cpu.id for cpu, e in pending if any(x is e for x in cpu.pending_flush)}
        waiter = [remaining, trio.Event(), self._now]     # [2]: when the last CPU acked
        if remaining:
            self._sync_waiters.append(waiter)
            await waiter[1].wait()
            self._check_panic()
        self.trace_event("synced", sync, waiter[2])

    def text_poke_start(self, patches: list[tuple[int, bytes]]):
        """Write the patches and send the IPIs, without waiting: returns the sync's number
        (None when syncs are off) and the (cpu, IPI) pairs still pending; an IPI is acked
        once it is no longer in its CPU's `pending_flush`.  For a caller that cannot await
        (the optprobe optimizer, which runs between quanta)."""
        for addr, data in patches:
            self.memory.poke(addr, data)
            self._code_written(addr, data)
            if self.events.wants(TextWritten):
                self.events.publish(TextWritten(addr, data))
        self._c.text_syncs += 1
        sync = self._c.text_syncs
        self.trace_event("poke", tuple((a, d.hex()) for a, d in patches), sync, self._now)
        if not self.text_sync:
            return None, []  # the "no cross-CPU sync" configuration: stale translations survive
        ranges = [(a, a + len(d)) for a, d in patches]
        pending = []
        for cpu in self.cpus:
            if not cpu.online:
                continue
            if cpu.current is None and not cpu.deferred_trap:
                for a, b in ranges:
                    cpu.flush_tb(a, b)
            else:
                delay = self.conductor.randint("ipi", 0, self.ipi_delay) if self.ipi_delay else 0
                entry = [ranges, delay]
                cpu.pending_flush.append(entry)
                pending.append((cpu, entry))
        return sync, pending

    async def smp_call_function_many(self, cpus, func) -> None:
        """Run `func(cpu)` on each online CPU of `cpus`, on that CPU, and return when all
        have.  A CPU running a task takes the call as an IPI at the start of one of its next
        quanta, 0 to `ipi_delay` quanta late (the seeded coin of text_poke's sync); an idle
        CPU runs no guest code, so it takes the call at once."""
        remaining = set()
        for cpu in cpus:
            if not cpu.online:
                continue
            if cpu.current is None and not cpu.deferred_trap:
                func(cpu)
                continue
            delay = self.conductor.randint("ipi", 0, self.ipi_delay) if self.ipi_delay else 0
            cpu.pending_flush.append([func, delay])
            remaining.add(cpu.id)
        if remaining:
            waiter = [remaining, trio.Event(), self._now]
            self._sync_waiters.append(waiter)
            await waiter[1].wait()
            self._check_panic()

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

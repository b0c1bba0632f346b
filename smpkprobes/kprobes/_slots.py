"""Instruction slots: where probed instructions are single-stepped out of line.

Slots are carved from the slot area (guest read+execute only) and shared by every CPU.  A
slot is never handed out again before a grace period has shown that no CPU can still be
executing in it; a slot that was used for boosting is freed "dirty" and only collected
after a further grace period (`collect_garbage_slots`), as in the kernel.
"""

from __future__ import annotations

import heapq
from typing import Awaitable, Callable


class SlotLeakError(RuntimeError):
    pass


class InsnSlots:
    def __init__(self, area: tuple[int, int], slot_size: int,
                 synchronize: Callable[[], Awaitable[None]],
                 in_use_by_cpu: Callable[[int, int], bool]):
        self.slot_size = slot_size
        self._free = list(range(area[0], area[1] - slot_size + 1, slot_size))
        heapq.heapify(self._free)
        self._garbage: list[int] = []
        self._used: set[int] = set()
        self._synchronize = synchronize
        self._in_use_by_cpu = in_use_by_cpu

    async def get_insn_slot(self) -> int:
        if not self._free and self._garbage:
            await self.collect_garbage_slots()
        if not self._free:
            raise MemoryError("out of instruction slots")
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def free_insn_slot(self, slot: int, dirty: bool) -> None:
        """Free a slot.  The caller has waited a grace period since the last CPU could
        enter it; a dirty (boosted) slot waits one more before reuse."""
        if slot not in self._used:
            raise SlotLeakError(f"double free of insn slot {slot:#x}")
        if self._in_use_by_cpu(slot, slot + self.slot_size):
            raise SlotLeakError(f"insn slot {slot:#x} freed while a CPU executes in it")
        self._used.discard(slot)
        if dirty:
            self._garbage.append(slot)
        else:
            heapq.heappush(self._free, slot)

    async def collect_garbage_slots(self) -> None:
        garbage, self._garbage = self._garbage, []
        if not garbage:
            return
        await self._synchronize()
        for slot in garbage:
            heapq.heappush(self._free, slot)

    def is_used(self, slot: int) -> bool:
        """Whether `slot` (a slot's base address) is handed out."""
        return slot in self._used

    def statistics(self) -> dict:
        return {"used": len(self._used), "garbage": len(self._garbage), "free": len(self._free)}

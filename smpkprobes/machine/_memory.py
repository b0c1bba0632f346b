"""One physical memory, shared by every CPU.

A single anonymous host mapping backs the whole guest-physical address space; each region is
mapped into every Unicorn instance with `mem_map_ptr` at the matching offset, so a store by
one CPU is a store seen by all.  The host (text_poke, the probe core) writes the same buffer
directly, regardless of the guest's permissions - as the kernel writes its own text through
a temporary writable alias.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass

import unicorn

R, W, X = unicorn.UC_PROT_READ, unicorn.UC_PROT_WRITE, unicorn.UC_PROT_EXEC


@dataclass(frozen=True)
class Region:
    name: str
    start: int
    size: int
    perms: int

    @property
    def end(self) -> int:
        return self.start + self.size

    def __contains__(self, addr: int) -> bool:
        return self.start <= addr < self.start + self.size


# The memory map.  Everything sits below 2 GiB so that the same layout serves 32-bit guests;
# the kernel images are linked against it (smpkprobes/machine/kernel/src/arch/*/kernel.ld).
TEXT = Region("kernel text", 0x0010_0000, 0x10_0000, R | X)
DATA = Region("kernel data", 0x0020_0000, 0x10_0000, R | W)
MODULE_TEXT = Region("module text", 0x0040_0000, 0x10_0000, R | X)
MODULE_DATA = Region("module data", 0x0050_0000, 0x10_0000, R | W)
SLOTS = Region("insn slots", 0x0060_0000, 0x10_0000, R | X)
# Jump-optimized probes' detours: stubs, then buffers (smpkprobes/kprobes/_optprobe.py).
OPTINSN = Region("optinsn slots", 0x0080_0000, 0x10_0000, R | X)
STACKS = Region("stacks", 0x0100_0000, 0x400_0000, R | W)
REGIONS = (TEXT, DATA, MODULE_TEXT, MODULE_DATA, SLOTS, OPTINSN, STACKS)

STACK_SIZE = 0x4000


class GuestMemoryError(ValueError):
    pass


class PhysicalMemory:
    """The shared buffer and the region table."""

    def __init__(self, regions: tuple[Region, ...] = REGIONS):
        self.regions = regions
        self.size = max(r.end for r in regions)
        # Largest region first: the stacks, where the hit path's word accesses go.
        self._bounds = tuple((r.start, r.end) for r in sorted(regions, key=lambda r: -r.size))
        self._mm = mmap.mmap(-1, self.size)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))

    def map_into(self, uc) -> None:
        for r in self.regions:
            uc.mem_map_ptr(r.start, r.size, r.perms, self._base + r.start)

    def region_of(self, addr: int) -> Region | None:
        for r in self.regions:
            if addr in r:
                return r
        return None

    def _check(self, addr: int, size: int) -> None:
        # On the hit path (return addresses, stack words): plain int compares, no calls.
        end = addr + size
        for start, stop in self._bounds:
            if start <= addr and end <= stop:
                return
        raise GuestMemoryError(f"guest access {addr:#x}+{size:#x} is not mapped")

    def read(self, addr: int, size: int) -> bytes:
        self._check(addr, size)
        return self._mm[addr:addr + size]

    def write(self, addr: int, data: bytes) -> None:
        self._check(addr, len(data))
        self._mm[addr:addr + len(data)] = data

    # Unchecked fast paths for the probe core's own, already validated addresses.
    def peek(self, addr: int, size: int) -> bytes:
        return self._mm[addr:addr + size]

    def poke(self, addr: int, data: bytes) -> None:
        self._mm[addr:addr + len(data)] = data

    def fill(self, addr: int, size: int, byte: int = 0) -> None:
        self._check(addr, size)
        self._mm[addr:addr + size] = bytes([byte]) * size

    # Words, checked, for the CPUs' stack and return-address accesses (on the hit path).
    def unpack(self, layout: struct.Struct, addr: int) -> tuple:
        self._check(addr, layout.size)
        return layout.unpack_from(self._mm, addr)

    def pack(self, layout: struct.Struct, addr: int, *values: int) -> None:
        self._check(addr, layout.size)
        layout.pack_into(self._mm, addr, *values)

    def word_access(self, layout: struct.Struct, mask: int):
        """`(read, write)` of one machine word (`layout`) at a checked guest address, for a
        CPU's `read_word` and `write_word`: the return-address and stack accesses of every
        kretprobe hit, as one call each (unpack/pack behind a method cost three)."""
        unpack_from, pack_into, size = layout.unpack_from, layout.pack_into, layout.size
        mm, bounds, check = self._mm, self._bounds, self._check

        def read(addr: int) -> int:
            for start, stop in bounds:
                if start <= addr and addr + size <= stop:
                    return unpack_from(mm, addr)[0]
            check(addr, size)
            raise AssertionError("unreachable")      # pragma: no cover

        def write(addr: int, value: int) -> None:
            for start, stop in bounds:
                if start <= addr and addr + size <= stop:
                    pack_into(mm, addr, value & mask)
                    return
            check(addr, size)
        return read, write

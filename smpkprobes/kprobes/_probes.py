"""The user-facing probe objects: Kprobe, Jprobe, Kretprobe and its instances (see API.md)."""

from __future__ import annotations

from dataclasses import dataclass

from ..machine._services import Regs

KPROBE_FLAG_GONE = 1
KPROBE_FLAG_DISABLED = 2
KPROBE_FLAG_OPTIMIZED = 4
KPROBE_FLAG_FTRACE = 8

KRETPROBE_MAX_DATA_SIZE = 4096


class Kprobe:
    """A breakpoint on one instruction.  See API.md."""

    _type = "k"

    def __init__(self, symbol_name: str | None = None, offset: int = 0, addr: int | None = None,
                 pre_handler=None, post_handler=None, fault_handler=None):
        self.symbol_name = symbol_name
        self.offset = offset
        self.addr = addr
        self.pre_handler = pre_handler
        self.post_handler = post_handler
        self.fault_handler = fault_handler
        self.nmissed = 0
        self.flags = 0
        self._registered = False
        self._owner = None          # the Kretprobe or Jprobe this kprobe belongs to
        self._kprobes = None        # the subsystem (machine) it is registered on

    @property
    def disabled(self) -> bool:
        return bool(self.flags & KPROBE_FLAG_DISABLED)

    @property
    def gone(self) -> bool:
        return bool(self.flags & KPROBE_FLAG_GONE)

    @property
    def registered(self) -> bool:
        return self._registered

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {_where(self)}+{_hex(self.offset)}>"


def _hex(v) -> str:
    return f"{v:#x}" if isinstance(v, int) else repr(v)


def _where(kp: Kprobe) -> str:
    if isinstance(kp.symbol_name, str) and kp.symbol_name:
        return kp.symbol_name
    return _hex(kp.addr) if kp.addr is not None else "?"


class _JprobeReturn(BaseException):
    """Raised by the host-side `jprobe_return()` to end a Python jprobe handler."""


def jprobe_return():
    """End a Python jprobe handler, as a C one ends with `jprobe_return()`."""
    raise _JprobeReturn()


class Jprobe:
    """A probe on a function's entry whose handler mirrors the function's signature."""

    def __init__(self, entry, symbol_name: str | None = None, addr: int | None = None):
        self.entry = entry
        self.kp = Kprobe(symbol_name=symbol_name, addr=addr)
        self.kp._owner = self
        self.kp._type = "j"

    @property
    def nmissed(self) -> int:
        return self.kp.nmissed

    def __repr__(self) -> str:
        return f"<Jprobe {_where(self.kp)}>"


class KretprobeInstance:
    """`ri`: one in-flight call of a function with a return probe."""

    __slots__ = ("rp", "ret_addr", "task", "data", "cpu", "_owner")

    def __init__(self, owner: "Kretprobe", data_size: int):
        self._owner = owner
        self.rp = None
        self.ret_addr = 0
        self.task = None
        self.cpu = None
        self.data = bytearray(data_size)

    def __repr__(self) -> str:
        return f"<kretprobe_instance ret_addr={self.ret_addr:#x} task={self.task}>"


@dataclass(frozen=True)
class PoolStatistics:
    """The kretprobe instance pool, shared by all CPUs."""

    maxactive: int
    free: int
    in_use: int
    taken: int
    returned: int
    missed: int
    high_water: int
    taken_per_cpu: tuple[int, ...]
    entries: int = 0        # entries into the function: each took an instance or missed


class Kretprobe:
    """A return probe: hijacks the return address at entry, see API.md."""

    def __init__(self, handler=None, entry_handler=None, data_size: int = 0, maxactive: int = 0,
                 symbol_name: str | None = None, addr: int | None = None):
        self.handler = handler
        self.entry_handler = entry_handler
        self.data_size = data_size
        self.maxactive = maxactive
        self.nmissed = 0
        self.kp = Kprobe(symbol_name=symbol_name, addr=addr)
        self.kp._owner = self
        self.kp._type = "r"
        self.pool = InstancePool(self)

    def __repr__(self) -> str:
        return f"<Kretprobe {_where(self.kp)}>"

    def statistics(self) -> PoolStatistics:
        pool = self.pool
        return PoolStatistics(self.maxactive, len(pool.free), len(pool.used), pool.taken,
                              pool.returned, self.nmissed, pool.high,
                              tuple(pool.taken_per_cpu), pool.entries)


class InstancePool:
    """A kretprobe's instances (`maxactive` of them, shared by all CPUs): the free list, the
    ones in flight, and counts since registration.  Only the probe core changes it."""

    def __init__(self, rp: Kretprobe):
        self._rp = rp
        self.free: list[KretprobeInstance] = []
        # In flight, in the order taken: a dict as an ordered set (recycle is O(1)).
        self.used: dict[KretprobeInstance, None] = {}
        # Entries into the function since registration: each takes an instance or misses.
        self.entries = self.taken = self.returned = self.high = 0
        self.taken_per_cpu: list[int] = []

    def fill(self, n: int, data_size: int, ncpus: int) -> None:
        """A new registration: `n` fresh instances, the counts at zero."""
        self.free = [KretprobeInstance(self._rp, data_size) for _ in range(n)]
        self.used = {}
        self.entries = self.taken = self.returned = self.high = 0
        self.taken_per_cpu = [0] * ncpus

    def take(self, cpu_id: int) -> KretprobeInstance | None:
        """An entry into the function: an instance, or None when the pool is empty."""
        self.entries += 1
        if not self.free:
            return None
        ri = self.free.pop()
        used = self.used
        used[ri] = None
        self.taken += 1
        self.taken_per_cpu[cpu_id] += 1
        if len(used) > self.high:
            self.high = len(used)
        return ri

    def recycle(self, ri: KretprobeInstance) -> None:
        """Give an instance back to the pool (or drop it if orphaned)."""
        if ri.rp is None or ri._owner is not self._rp or ri not in self.used:
            return
        del self.used[ri]
        ri.rp = None
        ri.task = None
        self.free.append(ri)
        self.returned += 1

    def orphan_all(self) -> None:
        """Unregistered: the instances in flight keep running to their return, with no
        handler; none is recycled."""
        for ri in self.used:
            ri.rp = None
        self.used = {}
        self.free = []


def regs_return_value(regs: Regs) -> int:
    """The return value register by the arch's ABI (as an unsigned machine word)."""
    return regs.read(regs.cpu.backend.cc.ret_reg)

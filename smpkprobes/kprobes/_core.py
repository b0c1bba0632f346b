"""The probe core: registration, the per-CPU hit path, aggregates, kretprobes and jprobes.

Where the kernel's code would be:
  register_kprobe / unregister_kprobes ......... KprobesSubsystem.register_* / unregister_*
  arm_kprobe / disarm_kprobe ................... _arm / _disarm (text_poke + cross-CPU sync)
  kprobe_handler (do_int3) ..................... KprobesSubsystem._kprobe_handler (a hit),
                                                 _other_trap (step end, trampoline, stray)
  post_kprobe_handler / resume_execution ....... _post_kprobe_handler
  reenter_kprobe ............................... _reenter_kprobe
  kprobe_fault_handler ......................... _fault_fixup, _handler_fault
  struct kprobe_ctlblk (per CPU) ............... KprobeCtlblk, on `cpu.kprobe_ctlblk`
  aggregate kprobe ............................. _Site (one per probed address)
  get_insn_slot / free_insn_slot ............... _slots.InsnSlots
  pre_handler_kretprobe / trampoline_handler ... _pre_handler_kretprobe / _trampoline_handler
  setjmp_pre_handler / longjmp_break_handler ... _setjmp_pre_handler / _longjmp

Every probed address has one `_Site` that owns the saved instruction, the slot and the list
of children (newest first; jprobes last).  Handlers always run from a snapshot of that list,
so a handler may unregister probes.
"""

from __future__ import annotations

import enum
import errno as E
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import trio
import unicorn

from smpkprobes.cpus import InsnPlan, StepKind, UnsteppableError

from ..machine import _memory as mem
from .._errors import KprobeError, SimulationError
from ..machine._regs import Regs, regs_class
from ._slots import InsnSlots

if TYPE_CHECKING:    # pragma: no cover
    from ..machine._cpu import CPU
    from ..machine._machine import SMPMachine

KPROBE_FLAG_GONE = 1
KPROBE_FLAG_DISABLED = 2
KPROBE_FLAG_OPTIMIZED = 4
KPROBE_FLAG_FTRACE = 8

MAX_STACK_SIZE = 64
KRETPROBE_MAX_DATA_SIZE = 4096
# trapnr passed to fault handlers for a Python exception raised by a handler.
TRAP_HANDLER_EXCEPTION = -1
BLACKLIST = ("do_page_fault", "notifier_call_chain")


class Status(enum.Enum):
    NONE = 0
    HIT_ACTIVE = 1
    HIT_SS = 2
    HIT_SSDONE = 3
    REENTER = 4


# The hit path compares against these module globals rather than Status.X attribute lookups.
_NONE, _HIT_ACTIVE, _REENTER = Status.NONE, Status.HIT_ACTIVE, Status.REENTER


# == the user-facing probe objects ====================================================
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
        where = self.symbol_name or (f"{self.addr:#x}" if self.addr is not None else "?")
        return f"<{type(self).__name__} {where}+{self.offset:#x}>"


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
        kp = self.kp
        where = kp.symbol_name or (f"{kp.addr:#x}" if kp.addr is not None else "?")
        return f"<Jprobe {where}>"


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
        self._free: list[KretprobeInstance] = []
        self._used: list[KretprobeInstance] = []
        # Entries into the function since registration: each takes an instance or misses.
        self._entries = self._taken = self._returned = self._high = 0
        self._taken_per_cpu: list[int] = []

    def __repr__(self) -> str:
        kp = self.kp
        where = kp.symbol_name or (f"{kp.addr:#x}" if kp.addr is not None else "?")
        return f"<Kretprobe {where}>"

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(self.maxactive, len(self._free), len(self._used), self._taken,
                              self._returned, self.nmissed, self._high,
                              tuple(self._taken_per_cpu))

    def _recycle(self, ri: KretprobeInstance) -> None:
        """Give an instance back to the pool (or drop it if orphaned)."""
        if ri.rp is None or ri._owner is not self or ri not in self._used:
            return
        self._used.remove(ri)
        ri.rp = None
        ri.task = None
        self._free.append(ri)
        self._returned += 1


def regs_return_value(regs: Regs) -> int:
    """The return value register by the arch's ABI (as an unsigned machine word)."""
    return regs.read(regs.cpu.backend.cc.ret_reg)


# == the per-CPU control block ========================================================
class KprobeCtlblk:
    """`struct kprobe_ctlblk`: what one CPU is doing with probes right now.

    Setting `transitions` to a list records every status change into it, as (address of
    the current probe or 0, status name), until it is set back to None.  Recording swaps
    in a subclass meanwhile, so that the hit path's plain `kcb.status = ...` costs nothing
    more when it is off."""

    __slots__ = ("current", "status", "ss_addr", "prev", "jprobe_saved", "_log")

    def __init__(self):
        self.current: _Site | None = None
        self.status = Status.NONE
        self.ss_addr = 0
        self.prev = None            # one level of prev_kprobe: (current, status, ss_addr)
        self.jprobe_saved = None    # (context, sp, stack bytes)
        self._log = None

    @property
    def transitions(self) -> list | None:
        return self._log

    @transitions.setter
    def transitions(self, log: list | None) -> None:
        self._log = log
        self.__class__ = KprobeCtlblk if log is None else _RecordingCtlblk

    def reset(self) -> None:
        self.current = None
        self.status = Status.NONE
        self.ss_addr = 0
        self.jprobe_saved = None


_status_slot = KprobeCtlblk.status      # the slot itself, beneath the recording property


class _RecordingCtlblk(KprobeCtlblk):
    """A control block that logs its status changes to `transitions`."""

    __slots__ = ()

    @property
    def status(self) -> Status:
        return _status_slot.__get__(self)

    @status.setter
    def status(self, status: Status) -> None:
        _status_slot.__set__(self, status)
        self._log.append((self.current.addr if self.current else 0, status.name))


class _Site:
    """Everything at one probed address: the aggregate kprobe."""

    __slots__ = ("addr", "plan", "boostable", "orig", "slot", "children", "armed", "gone",
                 "boost_used")

    def __init__(self, addr: int, plan: InsnPlan, orig: bytes):
        self.addr = addr
        self.plan = plan
        # Stepped out of line with a jump back allowed (still never with a post_handler).
        self.boostable = plan is not None and plan.kind is StepKind.OUT_OF_LINE \
            and plan.boostable
        self.orig = orig
        self.slot: int | None = None
        self.children: tuple[Kprobe, ...] = ()
        self.armed = False
        self.gone = False
        self.boost_used = False

    def enabled(self) -> bool:
        return not self.gone and any(not c.disabled for c in self.children)

    def has_post_handler(self) -> bool:
        for c in self.children:
            if c.post_handler is not None and not c.flags & KPROBE_FLAG_DISABLED:
                return True
        return False

    def jprobe(self) -> Kprobe | None:
        return next((c for c in self.children if c._type == "j"), None)


@dataclass(frozen=True)
class KprobesStatistics:
    probes: int
    sites: int
    armed: int
    hits: int
    missed: int
    traps: int
    stray_traps: int
    slots_used: int


# == the subsystem =====================================================================
class KprobesSubsystem:
    """`m.kprobes`."""

    def __init__(self, machine: "SMPMachine"):
        self._m = machine
        self._backend = machine.backend
        self._bp = machine.backend.breakpoint
        self._table: dict[int, _Site] = {}
        self._by_slot: dict[int, _Site] = {}
        self._mutex = trio.Lock()           # kprobe_mutex
        self.enabled = True                 # kprobes/enabled
        self._boundaries: dict[int, frozenset[int]] = {}
        # Traps at a registered probe, and how each ended: a hit, a miss (reentry) or an
        # unrecoverable reentry.  The invariant checker compares them after every quantum.
        self.hits = self.missed = self.traps = self.unrecoverable = 0
        # Handlers of unregistered probes that were about to run: a bug, recorded where it
        # happens for the invariant checker to report: (address, probe, "pre_handler",
        # "post_handler" or "return handler"; the probe is the Kretprobe for the last).
        self.stale_handlers: list[tuple[int, Kprobe, str]] = []
        self._slot_stride = self._backend.slot_size // 2
        self.slots = InsnSlots(self._backend.slot_size, machine.synchronize, self._cpu_in_range)
        # Hot-path constants, looked up once.
        self._slot_lo, self._slot_hi = mem.SLOTS.start, mem.SLOTS.end
        self._trace = machine.trace
        self._Regs = regs_class(machine.backend)
        k = machine.kallsyms
        self._trampoline = k.lookup("kretprobe_trampoline").addr
        self._trampoline_site = _Site(self._trampoline, None, b"")
        self._jprobe_return = k.lookup("jprobe_return").addr
        text = machine.kernel.sections[".text"]
        self._kernel_text = (text[0], text[0] + text[1])
        self._blacklist = []
        for name in BLACKLIST:
            s = k.lookup(name)
            if s is not None:
                self._blacklist.append((s.addr, s.addr + max(s.size, 1), name))
        for cpu in machine.cpus:
            cpu.kprobe_ctlblk = KprobeCtlblk()
        machine.trap_handler = self._kprobe_handler
        machine.fault_fixup = self._fault_fixup
        machine.return_address_resolver = self._resolve_return_address
        machine.task_exit_notifiers.append(self._kprobe_flush_task)
        machine.oops_notifiers.append(self._oops_reset)
        machine.module_notifiers.append(self._module_event)
        self.simulation_errors: list[str] = []

    # -- introspection ------------------------------------------------------------------
    def statistics(self) -> KprobesStatistics:
        return KprobesStatistics(
            probes=sum(len(s.children) for s in self._table.values()), sites=len(self._table),
            armed=sum(s.armed for s in self._table.values()), hits=self.hits,
            missed=self.missed, traps=self.traps,
            stray_traps=self._m.statistics().stray_traps,
            slots_used=self.slots.statistics()["used"])

    def probes(self) -> list[tuple[int, Kprobe]]:
        """(address, probe) for every registered probe, sorted by address then list order."""
        return [(a, c) for a in sorted(self._table) for c in self._table[a].children]

    def sites(self) -> dict[int, _Site]:
        return dict(self._table)

    def blacklist(self) -> list[tuple[int, int, str]]:
        k = self._m.kallsyms
        lo, hi = self._m.kprobes_text
        ranges = list(self._blacklist)
        for s in k.functions():
            if lo <= s.addr < hi:
                ranges.append((s.addr, s.addr + s.size, s.name))
        return sorted(ranges)

    def original_text(self, addr: int, size: int) -> bytes:
        """Text as it would be without any breakpoint (recover_probed_instruction)."""
        buf = bytearray(self._m.memory.peek(addr, size))
        n = len(self._bp)
        for a in range(addr - n + 1, addr + size):
            site = self._table.get(a)
            if site is not None and site.armed:
                for i in range(n):
                    if 0 <= a + i - addr < size:
                        buf[a + i - addr] = site.orig[i]
        return bytes(buf)

    # == registration ====================================================================
    async def register_kprobe(self, p: Kprobe) -> None:
        async with self._mutex:
            await self._register(p)

    async def register_kprobes(self, probes) -> None:
        await self._register_batch(list(probes), self._register)

    async def register_kretprobe(self, rp: Kretprobe) -> None:
        async with self._mutex:
            await self._register_kretprobe(rp)

    async def register_kretprobes(self, rps) -> None:
        await self._register_batch(list(rps), self._register_kretprobe)

    async def register_jprobe(self, jp: Jprobe) -> None:
        async with self._mutex:
            await self._register_jprobe(jp)

    async def register_jprobes(self, jps) -> None:
        await self._register_batch(list(jps), self._register_jprobe)

    async def _register_jprobe(self, jp: Jprobe) -> None:
        jp.kp.pre_handler = self._setjmp_pre_handler
        await self._register(jp.kp)

    async def _register_batch(self, items: list, register_one) -> None:
        if not items:
            raise KprobeError(E.EINVAL, "empty probe list")
        async with self._mutex:
            done = []
            for i, item in enumerate(items):
                try:
                    await register_one(item)
                except KprobeError as err:
                    if done:
                        await self._unregister_many([self._kp_of(x) for x in done])
                        for x in done:
                            if isinstance(x, Kretprobe):
                                self._cleanup_kretprobe(x)
                    raise KprobeError(err.errno, f"probe {i}: {err.strerror}", index=i) from None
                done.append(item)

    @staticmethod
    def _kp_of(item) -> Kprobe:
        return item if isinstance(item, Kprobe) else item.kp

    def _resolve(self, p: Kprobe, kind: str) -> int:
        """The checks of KPROBES.md section 2, in order, up to the probed address."""
        m = self._m
        if (p.symbol_name is None) == (p.addr is None):
            raise KprobeError(E.EINVAL, "exactly one of symbol_name and addr must be set")
        if p.symbol_name is not None:
            sym = m.kallsyms.lookup(p.symbol_name)
            if sym is None:
                raise KprobeError(E.ENOENT, f"unknown symbol {p.symbol_name!r}")
            addr = sym.addr + p.offset
        else:
            addr = p.addr + p.offset
        if p._registered:
            raise KprobeError(E.EINVAL, f"{p!r} is already registered")
        module = m.module_of(addr)
        in_kernel = self._kernel_text[0] <= addr < self._kernel_text[1]
        lo, hi = m.kprobes_text
        if not (in_kernel or module is not None) or lo <= addr < hi:
            raise KprobeError(E.EINVAL, f"{addr:#x} is not probeable text")
        for start, end, name in self._blacklist:
            if start <= addr < end:
                raise KprobeError(E.EINVAL, f"{m.format_addr(addr)} is on the blacklist ({name})")
        if kind == "r":
            sym = m.kallsyms.containing(addr)
            if sym is not None and sym.name in self._backend.kretprobe_blacklist:
                raise KprobeError(E.EINVAL, f"kretprobes may not probe {sym.name}")
        if module is not None and module.in_init(addr) and module.init_freed:
            raise KprobeError(E.ENOENT, f"{addr:#x} is in freed init text of {module.name}")
        sym = m.kallsyms.containing(addr)
        if sym is None or not sym.is_func:
            raise KprobeError(E.EINVAL, f"{addr:#x} is not inside a known function")
        if addr not in self._insn_boundaries(sym):
            raise KprobeError(E.EILSEQ, f"{m.format_addr(addr)} is not on an instruction boundary")
        return addr

    def _insn_boundaries(self, sym) -> frozenset[int]:
        b = self._boundaries.get(sym.addr)
        if b is None:
            code = self.original_text(sym.addr, sym.size)
            starts = []
            off = 0
            while off < len(code):
                size = self._backend.insn_length(code[off:], sym.addr + off)
                if size is None:
                    break
                starts.append(sym.addr + off)
                off += size
            b = self._boundaries[sym.addr] = frozenset(starts)
        return b

    async def _register(self, p: Kprobe) -> None:
        kind = p._type
        addr = self._resolve(p, kind)
        site = self._table.get(addr)
        if site is None:
            try:
                plan = self._backend.plan_probe(self.original_text, addr)
            except UnsteppableError as err:
                raise KprobeError(err.errno, f"{self._m.format_addr(addr)}: cannot single-step: "
                                             f"{err.reason}") from None
        else:
            plan = site.plan
        if kind in ("r", "j"):
            sym = self._m.kallsyms.containing(addr)
            if addr != sym.addr:
                raise KprobeError(E.EINVAL, f"{'kretprobe' if kind == 'r' else 'jprobe'} must be "
                                            f"at a function entry, not {self._m.format_addr(addr)}")
        if kind == "r" and p._owner.data_size > KRETPROBE_MAX_DATA_SIZE:
            raise KprobeError(E.E2BIG, f"data_size {p._owner.data_size} exceeds "
                                       f"{KRETPROBE_MAX_DATA_SIZE}")
        if kind == "j" and site is not None and site.jprobe() is not None:
            raise KprobeError(E.EEXIST, f"a jprobe is already registered at "
                                        f"{self._m.format_addr(addr)}")
        # All checks passed: from here on nothing can fail half-way.
        if site is None:
            site = _Site(addr, plan, plan.orig[:len(self._bp)])
            if plan.kind is StepKind.OUT_OF_LINE:
                site.slot = await self.slots.get_insn_slot()
                stride = self._slot_stride
                code = self._backend.slot_code(plan, site.slot, boost=False)
                boosted = self._backend.slot_code(plan, site.slot + stride, boost=True)
                await self._m.text_poke_batch([(site.slot, code), (site.slot + stride, boosted)])
                self._by_slot[site.slot] = site
            self._table[addr] = site
        p.addr = addr if p.symbol_name is None else addr
        p.flags &= ~KPROBE_FLAG_GONE
        # Newest first; a jprobe always last (it ends the pre_handler chain).
        if kind == "j":
            site.children = (*site.children, p)
        else:
            site.children = (p, *site.children)
        p._registered = True
        # Remembered for kprobes/list: a GONE probe's module symbols are gone too.
        p._where = self._m.symbolize(addr)
        self._m.trace_event("register", kind, addr, self._m.now_ns())
        if self.enabled and site.enabled() and not site.armed:
            await self._arm([site])
        if p.symbol_name is not None:
            p.addr = addr

    async def _arm(self, sites: list[_Site]) -> None:
        patches = []
        for s in sites:
            s.armed = True
            patches.append((s.addr, self._bp))
        await self._m.text_poke_batch(patches)

    async def _disarm(self, sites: list[_Site]) -> None:
        patches = []
        for s in sites:
            s.armed = False
            if not s.gone:
                patches.append((s.addr, s.orig))
        await self._m.text_poke_batch(patches)

    # == unregistration ==================================================================
    async def unregister_kprobe(self, p: Kprobe) -> None:
        await self.unregister_kprobes([p])

    async def unregister_kprobes(self, probes) -> None:
        async with self._mutex:
            await self._unregister_many(list(probes))

    async def unregister_jprobe(self, jp: Jprobe) -> None:
        await self.unregister_jprobes([jp])

    async def unregister_jprobes(self, jps) -> None:
        async with self._mutex:
            await self._unregister_many([j.kp for j in jps])

    async def unregister_kretprobe(self, rp: Kretprobe) -> None:
        await self.unregister_kretprobes([rp])

    async def unregister_kretprobes(self, rps) -> None:
        rps = list(rps)
        async with self._mutex:
            await self._unregister_many([rp.kp for rp in rps])
            for rp in rps:
                self._cleanup_kretprobe(rp)

    async def _unregister_many(self, probes: list[Kprobe]) -> None:
        """Top half for all (unlink, disarm), one grace period, bottom half for all."""
        dead_sites: list[_Site] = []
        to_disarm: list[_Site] = []
        valid = []
        for p in probes:
            site = self._table.get(p.addr) if p._registered else None
            if site is None or p not in site.children:
                p.addr = None          # an "incorrect" probe
                continue
            valid.append(p)
            site.children = tuple(c for c in site.children if c is not p)
            if not site.children:
                del self._table[site.addr]
                dead_sites.append(site)
                if site.armed:
                    to_disarm.append(site)
            elif site.armed and not site.enabled():
                to_disarm.append(site)
        if not valid:
            return
        if to_disarm:
            await self._disarm(to_disarm)
        await self._m.synchronize()
        for site in dead_sites:
            if site.slot is not None:
                del self._by_slot[site.slot]
                self.slots.free_insn_slot(site.slot, dirty=site.boost_used)
                site.slot = None
        for p in valid:
            p._registered = False
            self._m.trace_event("unregister", p._type, p.addr, self._m.now_ns())

    # == enable / disable ================================================================
    async def enable_kprobe(self, p: Kprobe) -> None:
        async with self._mutex:
            site = self._registered_site(p)
            if p.gone:
                raise KprobeError(E.EINVAL, f"{p!r} is gone (its module text was freed)")
            p.flags &= ~KPROBE_FLAG_DISABLED
            if self.enabled and site.enabled() and not site.armed:
                await self._arm([site])

    async def disable_kprobe(self, p: Kprobe) -> None:
        async with self._mutex:
            site = self._registered_site(p)
            p.flags |= KPROBE_FLAG_DISABLED
            if site.armed and not site.enabled():
                await self._disarm([site])

    def _registered_site(self, p: Kprobe) -> _Site:
        site = self._table.get(p.addr) if p._registered else None
        if site is None:
            raise KprobeError(E.EINVAL, f"{p!r} is not registered")
        return site

    async def set_enabled(self, enabled: bool) -> None:
        """kprobes/enabled: arm or disarm every probe, on all CPUs, before returning."""
        async with self._mutex:
            if enabled == self.enabled:
                return
            self.enabled = enabled
            if enabled:
                await self._arm([s for s in self._sorted_sites() if s.enabled() and not s.armed])
            else:
                await self._disarm([s for s in self._sorted_sites() if s.armed])

    def _sorted_sites(self) -> list[_Site]:
        return [self._table[a] for a in sorted(self._table)]

    # == modules =========================================================================
    def _module_event(self, event: str, module) -> None:
        in_range = module.in_init if event == "init_freed" else \
            (lambda a: module.in_text(a) or module.in_init(a))
        for site in self._sorted_sites():
            if not in_range(site.addr) or site.gone:
                continue
            # kill_kprobe: the text is gone, so it is not restored.
            site.gone = True
            site.armed = False
            for c in site.children:
                c.flags |= KPROBE_FLAG_GONE
            if site.slot is not None:
                del self._by_slot[site.slot]
                self.slots.free_insn_slot(site.slot, dirty=True)
                site.slot = None

    # == the hit path (runs inside a Unicorn callback) ====================================
    def _kprobe_handler(self, cpu: "CPU", addr: int) -> bool | int:
        """kprobe_int3_handler: a breakpoint trap at `addr`.  Returns False if it is no
        breakpoint of ours, else True, or the address to resume at for the CPU's hook to
        set (see SMPMachine.trap_handler).

        A hit on a registered probe is the hot path, written out in one function on
        purpose (every call and attribute chain here is paid on each hit): the normal hit,
        its pre_handlers and, when allowed, the boosted step.  Everything else goes to
        `_other_trap`."""
        site = self._table.get(addr)
        if site is None:
            return self._other_trap(cpu, addr)
        children = site.children
        if not children:
            return self._other_trap(cpu, addr)
        self.traps += 1
        kcb: KprobeCtlblk = cpu.kprobe_ctlblk
        if kcb.current is not None:
            self._reenter_kprobe(cpu, kcb, site)
            return True
        cpu.preempt_count += 1
        kcb.current = site
        kcb.status = _HIT_ACTIVE
        self.hits += 1
        # The trace keeps its events for ever, and much of what a hit costs is the memory
        # they take: name the site's own address object rather than the int made from
        # this trap's PC, and share the timestamp object between the hit and its step.
        addr = site.addr
        trace = self._trace
        t = cpu.clock + cpu.intra
        hit = ("hit", cpu.id, addr, t)
        trace.append(hit)
        regs = self._Regs(cpu, addr)
        for child in children:
            if not child._registered:
                self.stale_handlers.append((addr, child, "pre_handler"))
            if child.flags & KPROBE_FLAG_DISABLED or child.pre_handler is None:
                continue
            try:
                ret = child.pre_handler(child, regs)
            except _JprobeReturn:
                ret = 0
            except BaseException as exc:
                if not self._handler_fault(cpu, child, regs, exc):
                    return True
                continue
            if kcb.current is None:
                return True               # the task died inside the handler
            if ret:
                # The handler redirected execution: no single-step (and for a jprobe, the
                # CPU is sent to the jprobe's entry with this probe still current).
                if kcb.jprobe_saved is not None:
                    regs.flush()
                    cpu.pc = regs.read("ip")
                    return True
                self._finish(cpu, kcb, regs, resume=regs.read("ip"))
                return True
        if site.boostable and kcb.status is not _REENTER:
            for child in children:
                if child.post_handler is not None and not child.flags & KPROBE_FLAG_DISABLED:
                    break
            else:
                # Boosted (see _prepare_singlestep), written out here.
                t_ss = cpu.clock + cpu.intra
                if t_ss == t:
                    t_ss = t
                if trace and trace[-1] is hit:
                    # Nothing traced since the hit: one "boost" event stands for both.
                    trace[-1] = ("boost", hit[1], addr, t, t_ss)
                else:
                    trace.append(("ss", cpu.id, addr, t_ss, "boost"))
                site.boost_used = True
                if regs._dirty:
                    regs.flush_except_pc()
                kcb.current = None
                kcb.status = _NONE
                kcb.jprobe_saved = None
                cpu.preempt_count -= 1
                return site.slot + self._slot_stride
        return self._prepare_singlestep(cpu, kcb, site, regs) or True

    def _other_trap(self, cpu: "CPU", addr: int) -> bool:
        """A breakpoint trap at no registered probe: the end of a single-step, the kretprobe
        trampoline, jprobe_return(), or a stray trap whose probe is already gone."""
        kcb: KprobeCtlblk = cpu.kprobe_ctlblk
        if self._slot_lo <= addr < self._slot_hi:
            if kcb.status in (Status.HIT_SS, Status.REENTER):
                if addr == kcb.ss_addr:
                    site = kcb.current
                    self._post_kprobe_handler(cpu, kcb, site.addr + site.plan.length)
                    return True
                # A step with several exits (a conditional branch: taken or not).
                site = kcb.current
                resume = site.plan.exit_resume(addr - site.slot) \
                    if site is not None and site.slot is not None else None
                if resume is not None:
                    self._post_kprobe_handler(cpu, kcb, resume)
                    return True
            return False
        if addr == self._trampoline:
            return self._trampoline_handler(cpu, kcb)
        if addr == self._jprobe_return and kcb.jprobe_saved is not None:
            self._longjmp(cpu, kcb)
            return True
        code = self._m.memory.peek(addr, len(self._bp))
        if not self._backend.is_trap_insn(code):
            # The probe was removed after this CPU trapped: re-execute the original
            # instruction.  The trap serialises this CPU, so drop its stale translation.
            cpu.flush_tb(addr, addr + len(self._bp))
            cpu.pc = addr
            self._m.count_stray_trap()
            self._m.trace_event("stray", cpu.id, addr, cpu.clock + cpu.intra)
            return True
        return False

    def _prepare_singlestep(self, cpu: "CPU", kcb: KprobeCtlblk, site: _Site,
                            regs: Regs) -> int | None:
        """Step the probed instruction: returns the address the CPU goes on at (a slot),
        for the caller to set, or None when the step is over already (simulated)."""
        plan = site.plan
        reenter = kcb.status is Status.REENTER
        if plan.kind is StepKind.SIMULATE:
            self._trace.append(("ss", cpu.id, site.addr, cpu.clock + cpu.intra, "simulate"))
            if not reenter:
                kcb.status = Status.HIT_SS
            regs.write("ip", site.addr)
            plan.simulate(regs)
            self._run_post_handlers(cpu, kcb, site, regs)
            return None
        if plan.boostable and not site.has_post_handler() and not reenter:
            # Boosted: the slot jumps back by itself.  Preemption is enabled again before
            # the CPU enters the slot; grace periods still wait for it to leave (PC check).
            self._trace.append(("ss", cpu.id, site.addr, cpu.clock + cpu.intra, "boost"))
            site.boost_used = True
            regs.flush_except_pc()
            kcb.current = None
            kcb.status = Status.NONE
            kcb.jprobe_saved = None
            cpu.preempt_count -= 1
            return site.slot + self._slot_stride
        self._trace.append(("ss", cpu.id, site.addr, cpu.clock + cpu.intra, "slot"))
        if not reenter:
            kcb.status = Status.HIT_SS
        kcb.ss_addr = site.slot + plan.length
        regs.flush_except_pc()
        return site.slot

    def _post_kprobe_handler(self, cpu: "CPU", kcb: KprobeCtlblk, resume: int) -> None:
        site = kcb.current
        if kcb.status is Status.REENTER:
            # (A normal step's end is its "done": post handlers take no virtual time.)
            self._trace.append(("ssdone", cpu.id, site.addr, cpu.clock + cpu.intra))
            cpu.pc = resume
            self._restore_previous_kprobe(kcb)
            return
        regs = self._Regs(cpu, resume)
        cpu.pc = resume
        self._run_post_handlers(cpu, kcb, site, regs, resume)

    def _run_post_handlers(self, cpu: "CPU", kcb: KprobeCtlblk, site: _Site, regs: Regs,
                           pc: int | None = None) -> None:
        if kcb.status is Status.REENTER:
            regs.flush()
            cpu.pc = regs.read("ip")
            self._restore_previous_kprobe(kcb)
            return
        kcb.status = Status.HIT_SSDONE
        for child in site.children:
            if not child._registered:
                self.stale_handlers.append((site.addr, child, "post_handler"))
            if child.flags & KPROBE_FLAG_DISABLED or child.post_handler is None:
                continue
            try:
                child.post_handler(child, regs, 0)
            except BaseException as exc:
                if not self._handler_fault(cpu, child, regs, exc):
                    return
        self._finish(cpu, kcb, regs, resume=regs.read("ip"), pc=pc)

    def _finish(self, cpu: "CPU", kcb: KprobeCtlblk, regs: Regs, resume: int,
                pc: int | None = None) -> None:
        """The probe is done on this CPU: resume at `resume`.  `pc` is where the caller has
        put the PC, or will (the end of a step, set before the post_handlers ran, so that
        they and an oops see it; or the address a trap handler returns for the CPU's hook
        to set): when it is `resume`, the CPU is not written here, a call into Unicorn
        the stepped path would otherwise pay twice on every hit."""
        site = kcb.current
        self._trace.append(("done", cpu.id, site.addr if site is not None else 0,
                            cpu.clock + cpu.intra))
        if regs._dirty:
            regs.flush_except_pc()
        if resume != pc:
            cpu.pc = resume
        kcb.reset()
        cpu.preempt_count -= 1

    def _reenter_kprobe(self, cpu: "CPU", kcb: KprobeCtlblk, site: _Site) -> None:
        if kcb.status is Status.REENTER:
            msg = (f"Unrecoverable kprobe detected at {self._m.format_addr(site.addr)} "
                   f"({', '.join(repr(c) for c in site.children)})")
            self.unrecoverable += 1
            self.simulation_errors.append(msg)
            self._m.printk_log.append(msg)
            self._m.kill_current(cpu, msg)
            return
        for child in site.children:
            child.nmissed += 1
        self.missed += 1
        self._m.trace_event("miss", cpu.id, site.addr, cpu.clock + cpu.intra)
        kcb.prev = (kcb.current, kcb.status, kcb.ss_addr)
        kcb.current = site
        kcb.status = Status.REENTER
        regs = self._Regs(cpu, site.addr)
        pc = self._prepare_singlestep(cpu, kcb, site, regs)
        if pc is not None:
            cpu.pc = pc

    def _restore_previous_kprobe(self, kcb: KprobeCtlblk) -> None:
        kcb.current, status, kcb.ss_addr = kcb.prev
        kcb.prev = None
        kcb.status = status

    # -- faults ---------------------------------------------------------------------------
    def _handler_fault(self, cpu: "CPU", child: Kprobe, regs: Regs, exc: BaseException) -> bool:
        """A handler raised: count a miss, ask the fault_handler, else oops the task.
        Returns True if execution may go on."""
        child.nmissed += 1
        trapnr = (self._backend.page_fault_trapnr if type(exc).__name__ == "GuestFault"
                  else TRAP_HANDLER_EXCEPTION)
        if child.fault_handler is not None:
            try:
                if child.fault_handler(child, regs, trapnr):
                    return True
            except BaseException as exc2:
                exc = exc2
        where = self._m.format_addr(child.addr) if child.addr is not None else "?"
        owner = child._owner if child._owner is not None else child
        self._m.kill_current(cpu, f"exception in a handler of {owner!r} at {where}: "
                                  f"{type(exc).__name__}: {exc}")
        return False

    def _fault_fixup(self, cpu: "CPU", err: unicorn.UcError) -> bool:
        """A guest fault.  During a single-step: put the IP back at the probe address,
        restore the status, and let the fault be handled normally (it oopses)."""
        kcb: KprobeCtlblk = cpu.kprobe_ctlblk
        pc = cpu.pc
        if kcb.status in (Status.HIT_SS, Status.REENTER) and kcb.current is not None:
            site = kcb.current
            cpu.pc = site.addr
            if kcb.status is Status.REENTER:
                self._restore_previous_kprobe(kcb)
            else:
                kcb.reset()
                cpu.preempt_count -= 1
            return False
        base = pc - (pc - mem.SLOTS.start) % self._backend.slot_size
        if pc in mem.SLOTS and base in self._by_slot:
            cpu.pc = self._by_slot[base].addr      # a boosted copy faulted
        return False

    def _oops_reset(self, cpu: "CPU") -> None:
        kcb: KprobeCtlblk = cpu.kprobe_ctlblk
        kcb.reset()
        kcb.prev = None

    def _cpu_in_range(self, start: int, end: int) -> bool:
        for cpu in self._m.cpus:
            kcb = cpu.kprobe_ctlblk
            if kcb.current is not None and kcb.current.slot is not None \
                    and start <= kcb.current.slot < end:
                return True
            if cpu.current is not None and start <= cpu.pc < end:
                return True
        return False

    # == kretprobes ======================================================================
    async def _register_kretprobe(self, rp: Kretprobe) -> None:
        if rp.kp._registered:
            # Checked before the pool is touched: rebuilding it would strand the instances
            # of the live registration (their returns could never be recycled).
            raise KprobeError(E.EINVAL, f"{rp!r} is already registered")
        if rp.maxactive <= 0:
            n = self._m.ncpus
            rp.maxactive = max(10, 2 * n) if self._m.preempt else n
        rp.kp.pre_handler = self._pre_handler_kretprobe
        # An oversized data_size is refused (E2BIG) by _register, in the order of
        # KPROBES.md section 2; do not try to allocate it first.
        size = rp.data_size if 0 <= rp.data_size <= KRETPROBE_MAX_DATA_SIZE else 0
        rp._free = [KretprobeInstance(rp, size) for _ in range(rp.maxactive)]
        rp._used = []
        rp._entries = rp._taken = rp._returned = rp._high = 0
        rp._taken_per_cpu = [0] * self._m.ncpus
        rp.nmissed = 0
        try:
            await self._register(rp.kp)
        except KprobeError:
            rp._free = []
            raise

    def _pre_handler_kretprobe(self, p: Kprobe, regs: Regs) -> int:
        rp: Kretprobe = p._owner
        rp._entries += 1
        cpu = regs.cpu
        # Taking an instance happens inside the trap, with preemption disabled: it is
        # atomic with respect to every other simulated CPU.
        if not rp._free:
            rp.nmissed += 1
            self._m.trace_event("rp_miss", cpu.id, p.addr, cpu.clock + cpu.intra)
            return 0
        ri = rp._free.pop()
        rp._used.append(ri)
        rp._taken += 1
        rp._taken_per_cpu[cpu.id] += 1
        rp._high = max(rp._high, len(rp._used))
        ri.rp = rp
        ri.task = cpu.current
        ri.cpu = cpu.id
        ri.ret_addr = self._backend.cc.get_return_address(regs)
        if rp.entry_handler is not None:
            try:
                skip = rp.entry_handler(ri, regs)
            except BaseException:
                rp._recycle(ri)
                raise
            if skip:
                rp._recycle(ri)
                return 0
        self._backend.cc.set_return_address(regs, self._trampoline)
        cpu.current.kretprobe_instances.append(ri)
        return 0

    def _trampoline_handler(self, cpu: "CPU", kcb: KprobeCtlblk) -> bool | int:
        task = cpu.current
        stack = task.kretprobe_instances if task is not None else []
        if not stack:
            msg = (f"kretprobe BUG!: Processing kretprobe trampoline @ {self._trampoline:#x} "
                   f"with no instance for {task!r}")
            self.simulation_errors.append(msg)
            self._m.printk_log.append(msg)
            self._m.kill_current(cpu, msg)
            return True
        # The real return address: the first instance (LIFO) not itself returning to the
        # trampoline (several kretprobes on one function chain through it).
        n = 0
        while n < len(stack):
            n += 1
            if stack[-n].ret_addr != self._trampoline:
                break
        batch = [stack.pop() for _ in range(n)]
        correct = batch[-1].ret_addr
        self._trace.append(("ret", cpu.id, correct, cpu.clock + cpu.intra))
        for ri in batch:
            ri.ret_addr = correct     # the chained ones recorded the trampoline at entry
        regs = self._Regs(cpu, correct)      # the handlers see regs.ip == the real return
        cpu.preempt_count += 1
        kcb.current = self._trampoline_site      # probes hit in the handlers are missed
        kcb.status = Status.HIT_ACTIVE
        try:
            for ri in batch:
                rp = ri.rp
                if rp is not None and rp.handler is not None:
                    if not rp.kp._registered:
                        self.stale_handlers.append((rp.kp.addr, rp, "return handler"))
                    if not rp.kp.flags & KPROBE_FLAG_DISABLED:
                        try:
                            rp.handler(ri, regs)
                        except BaseException as exc:
                            for later in batch[batch.index(ri):]:
                                if later.rp is not None:
                                    later.rp._recycle(later)
                            self._handler_fault(cpu, rp.kp, regs, exc)
                            break
                if rp is not None:
                    rp._recycle(ri)
        except BaseException:
            if kcb.current is not None:
                self._finish(cpu, kcb, regs, resume=regs.read("ip"))
            raise
        if kcb.current is None:
            return True                      # the task died in a handler
        resume = regs.read("ip")
        self._finish(cpu, kcb, regs, resume, pc=resume)
        return resume                        # for the CPU's hook to set (see _kprobe_handler)

    def _kprobe_flush_task(self, task) -> None:
        for ri in task.kretprobe_instances:
            if ri.rp is not None:
                ri.rp._recycle(ri)
        task.kretprobe_instances.clear()

    def _cleanup_kretprobe(self, rp: Kretprobe) -> None:
        for ri in rp._used:
            ri.rp = None            # orphaned: the task still returns, no handler runs
        rp._used = []
        rp._free = []

    def _resolve_return_address(self, cpu: "CPU", addr: int, depth: int) -> tuple[int, int]:
        if addr != self._trampoline or cpu.current is None:
            return addr, depth
        stack = cpu.current.kretprobe_instances
        while depth < len(stack):
            ri = stack[-1 - depth]
            depth += 1
            if ri.ret_addr != self._trampoline:
                return ri.ret_addr, depth
        return addr, depth

    # == jprobes =========================================================================
    def _setjmp_pre_handler(self, p: Kprobe, regs: Regs) -> int:
        jp: Jprobe = p._owner
        cpu = regs.cpu
        kcb: KprobeCtlblk = cpu.kprobe_ctlblk
        cc = self._backend.cc
        regs.flush()
        sp, size = cc.stack_window(regs, MAX_STACK_SIZE)
        task = cpu.current
        size = min(size, task.stack_top - sp) if task is not None else size
        stack = self._m.memory.peek(sp, max(0, size))
        if callable(jp.entry) and not isinstance(jp.entry, (int, str)):
            # A Python entry gets copies of the arguments and no regs, so only the stack
            # (reachable through guest memory) needs saving: no CPU context round trip.
            nargs = jp.__dict__.get("_nargs")
            if nargs is None:
                nargs = jp._nargs = _arity(jp.entry, cc.default_arg_count)
            args = [cc.arg(regs, i) for i in range(nargs)]
            try:
                jp.entry(*args)
            except _JprobeReturn:
                pass
            else:
                name = getattr(jp.entry, "__qualname__", None) or repr(jp.entry)
                raise RuntimeError(f"jprobe handler {name} returned without calling "
                                   f"jprobe_return()")
            finally:
                self._m.memory.poke(sp, stack)
            return 0
        kcb.jprobe_saved = (cpu.context_save(), sp, stack)
        regs.write("ip", self._m.resolve_function(jp.entry))
        return 1

    def _longjmp(self, cpu: "CPU", kcb: KprobeCtlblk) -> None:
        """jprobe_return() trapped: restore registers and stack, then single-step the
        probed instruction."""
        ctx, sp, stack = kcb.jprobe_saved
        kcb.jprobe_saved = None
        cpu.context_restore(ctx)
        self._m.memory.poke(sp, stack)
        site = kcb.current
        regs = self._Regs(cpu, site.addr)
        pc = self._prepare_singlestep(cpu, kcb, site, regs)
        if pc is not None:
            cpu.pc = pc


def _arity(fn: Callable, default: int) -> int:
    """How many arguments `fn` takes; `default` (the calling convention's
    default_arg_count) more for *args, or in all when its signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return default
    n = 0
    for prm in params:
        if prm.kind is prm.VAR_POSITIONAL:
            return n + default
        if prm.kind in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD):
            n += 1
    return n

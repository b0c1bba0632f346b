"""`m.hw_breakpoints`: the hw_breakpoint API in the kernel's shape.

Where the kernel's code would be:
  register_wide_hw_breakpoint ........ register_wide_hw_breakpoint: one breakpoint per CPU,
                                       each installed on its CPU by a cross-CPU call
  register_user_hw_breakpoint ........ register_user_hw_breakpoint: on the task's list; loaded
                                       into a CPU's registers when the task is switched in
  modify_user_hw_breakpoint .......... modify_user_hw_breakpoint
  unregister_(wide_)hw_breakpoint .... _remove: uninstalled on every CPU holding it (cross-CPU
                                       calls) before the call returns, then its slots freed
  hw_breakpoint_arch_parse ........... _parse (EINVAL, and the arch's own refusal)
  toggle_bp_slot / reserve_bp_slot ... _constraints.SlotConstraints (ENOSPC)
  perf_bp_event (the handler) ........ trigger

After an unregister returns, no CPU holds the breakpoint, so its handler runs nowhere; a
trigger of an unregistered breakpoint is recorded in `stale_triggers` (a bug).
"""

from __future__ import annotations

import errno as E
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import trio

from smpkprobes.cpus import hw_breakpoint_facts

from .._errors import KprobeError
from ..machine._services import TRAP_COST_NS, HwBreakpointServices, TaskExited, TaskScheduledIn
from ._constraints import SlotConstraints
from ._debugreg import DebugRegisters, TriggerData

if TYPE_CHECKING:    # pragma: no cover
    from ..machine._cpu import CPU

TYPES = ("r", "w", "rw", "x")


@dataclass(frozen=True)
class HwBreakpointAttr:
    """The breakpoint part of perf_event_attr: where (`bp_addr`, or `symbol_name`), how many
    bytes (`bp_len`) and which accesses (`bp_type`: "r", "w", "rw" or "x").  `disabled`
    registers (or modifies) it without installing it, as perf's attr.disabled does."""

    bp_addr: int | None = None
    symbol_name: str | None = None
    bp_len: int = 8
    bp_type: str = "w"
    disabled: bool = False


class HwBreakpoint:
    """One breakpoint (the kernel's struct perf_event): bound to a CPU (`cpu`, a member of a
    wide breakpoint) or to a task (`task`).  `hits` counts its triggered calls."""

    def __init__(self, attr: HwBreakpointAttr, addr: int, pool: str, triggered,
                 cpu: int | None = None, task=None):
        self.attr = attr
        self.addr = addr
        self.pool = pool            # the slot pool it takes: "data" or "inst"
        self.triggered = triggered
        self.cpu = cpu
        self.task = task
        self.hits = 0
        self.registered = True

    @property
    def len(self) -> int:
        return self.attr.bp_len

    @property
    def type(self) -> str:
        return self.attr.bp_type

    def __repr__(self) -> str:
        where = f"cpu{self.cpu}" if self.task is None else f"task {self.task.pid}"
        return f"<hw_breakpoint {self.addr:#x}/{self.len}:{self.type} {where}>"


class WideHwBreakpoint:
    """What register_wide_hw_breakpoint returns: one breakpoint per CPU (`handle[cpu]`)."""

    def __init__(self, per_cpu: tuple[HwBreakpoint, ...]):
        self.per_cpu = per_cpu

    def __getitem__(self, cpu: int) -> HwBreakpoint:
        return self.per_cpu[cpu]

    def __len__(self) -> int:
        return len(self.per_cpu)

    @property
    def hits(self) -> int:
        return sum(bp.hits for bp in self.per_cpu)

    def __repr__(self) -> str:
        bp = self.per_cpu[0]
        return f"<wide hw_breakpoint {bp.addr:#x}/{bp.len}:{bp.type} on {len(self)} CPUs>"


class HwBreakpointSubsystem:
    """`m.hw_breakpoints`, on the machine's `HwBreakpointServices` (machine/_services.py)."""

    def __init__(self, kernel: HwBreakpointServices):
        self._kernel = kernel
        self.facts = hw_breakpoint_facts(kernel.arch)
        self.constraints = SlotConstraints(kernel.ncpus, self.facts)
        self.debugregs = [DebugRegisters(cpu, self, kernel)
                          for cpu in kernel.cpus]
        self._wide: list[WideHwBreakpoint] = []
        self._user: list[HwBreakpoint] = []
        # Triggers of a breakpoint that was already unregistered (must stay empty), and
        # slot-table warnings (ditto).
        self.stale_triggers: list[tuple[int, HwBreakpoint]] = []
        self.warnings: list[str] = []
        self._endian = kernel.backend.endian
        kernel.subscribe(TaskScheduledIn, lambda e: self._sched_in(e.cpu, e.task))
        kernel.subscribe(TaskExited, lambda e: self._task_exit(e.task))

    # == the API ===========================================================================
    async def register_wide_hw_breakpoint(self, attr: HwBreakpointAttr,
                                          triggered: Callable) -> WideHwBreakpoint:
        addr, pool = self._parse(attr)
        cpus = list(range(self._kernel.ncpus))
        self.constraints.reserve(pool, cpus)
        handle = WideHwBreakpoint(tuple(HwBreakpoint(attr, addr, pool, triggered, cpu=c)
                                        for c in cpus))
        self._wide.append(handle)
        self._kernel.trace_event("bp_register", addr, attr.bp_len, attr.bp_type, "wide",
                            self._kernel.now_ns())
        if not attr.disabled:
            await self._cross_call(self._wide_cpus(), lambda cpu: self._install_own(cpu, handle))
        return handle

    def _wide_cpus(self) -> list["CPU"]:
        """Every CPU installs its own member of a wide breakpoint."""
        return list(self._kernel.cpus)

    def _install_own(self, cpu: "CPU", handle: WideHwBreakpoint) -> None:
        self.debugregs[cpu.id].install(handle[cpu.id])

    async def unregister_wide_hw_breakpoint(self, handle: WideHwBreakpoint) -> None:
        if handle not in self._wide:
            return
        self._wide.remove(handle)
        await self._remove(list(handle.per_cpu))
        bp = handle[0]
        self.constraints.release(bp.pool, list(range(len(handle))))
        self._kernel.trace_event("bp_unregister", bp.addr, bp.len, bp.type, "wide", self._kernel.now_ns())

    async def register_user_hw_breakpoint(self, attr: HwBreakpointAttr, triggered: Callable,
                                          task) -> HwBreakpoint:
        if task.oops is not None or task.done.is_set():
            raise KprobeError(E.ESRCH, f"{task!r} has exited")
        addr, pool = self._parse(attr)
        self.constraints.reserve(pool, list(range(self._kernel.ncpus)), task)
        bp = HwBreakpoint(attr, addr, pool, triggered, task=task)
        self._user.append(bp)
        task.hw_breakpoints.append(bp)
        self._kernel.trace_event("bp_register", addr, attr.bp_len, attr.bp_type, "task",
                            self._kernel.now_ns())
        await self._reload_task(task)
        return bp

    async def modify_user_hw_breakpoint(self, bp: HwBreakpoint, attr: HwBreakpointAttr) -> None:
        if bp not in self._user:
            raise KprobeError(E.EINVAL, f"{bp!r} is not a registered user breakpoint")
        addr, pool = self._parse(attr)
        if pool != bp.pool:
            self.constraints.reserve(pool, list(range(self._kernel.ncpus)), bp.task)
            self.constraints.release(bp.pool, list(range(self._kernel.ncpus)), bp.task)
        # Off the task and every CPU first (a context switch meanwhile must not load it
        # again): a CPU's registers never hold a half-changed breakpoint.
        bp.task.hw_breakpoints.remove(bp)
        await self._remove([bp], unregister=False)
        bp.attr, bp.addr, bp.pool = attr, addr, pool
        bp.task.hw_breakpoints.append(bp)
        await self._reload_task(bp.task)

    async def unregister_hw_breakpoint(self, bp: HwBreakpoint) -> None:
        if bp not in self._user:
            return
        self._user.remove(bp)
        bp.task.hw_breakpoints.remove(bp)
        await self._remove([bp])
        self.constraints.release(bp.pool, list(range(self._kernel.ncpus)), bp.task)
        self._kernel.trace_event("bp_unregister", bp.addr, bp.len, bp.type, "task", self._kernel.now_ns())

    # == introspection ====================================================================
    def installed(self, cpu: int) -> list[tuple[str, int, HwBreakpoint]]:
        """(pool, slot, breakpoint) in CPU `cpu`'s debug registers."""
        return self.debugregs[cpu].breakpoints()

    def debugfs_list(self) -> str:
        """One line per breakpoint: address, length, type, symbol, owner, the slots holding
        it, hits."""
        w = self._kernel.backend.bits // 4
        lines = []
        for h in self._wide:
            lines.append(self._line(w, h[0], "wide", list(h.per_cpu), h.hits))
        for bp in self._user:
            lines.append(self._line(w, bp, f"pid {bp.task.pid}", [bp], bp.hits))
        return "".join(lines)

    def _line(self, w: int, bp: HwBreakpoint, owner: str, members, hits: int) -> str:
        held = []
        for regs in self.debugregs:
            for pool, i, b in regs.breakpoints():
                if any(b is m for m in members):
                    held.append(f"cpu{regs.cpu.id}:{pool}{i}")
        flags = " [DISABLED]" if bp.attr.disabled else ""
        return (f"{bp.addr:0{w}x}  {bp.len}  {bp.type:<2}  {self._kernel.format_addr(bp.addr)}  "
                f"{owner}  {' '.join(held) or '-'}  hits={hits}{flags}\n")

    # == internals ========================================================================
    def _parse(self, attr: HwBreakpointAttr) -> tuple[int, str]:
        """hw_breakpoint_arch_parse: the address, and the slot pool the type takes."""
        f = self.facts
        if f.unsupported:
            raise KprobeError(E.ENOSYS, f.unsupported)
        if not isinstance(attr, HwBreakpointAttr):
            raise TypeError(f"attr must be a HwBreakpointAttr, not {type(attr).__name__}")
        if attr.bp_type not in TYPES:
            raise KprobeError(E.EINVAL, f"bp_type must be one of {', '.join(TYPES)}, not "
                                        f"{attr.bp_type!r}")
        if attr.bp_type not in f.types:
            raise KprobeError(E.EINVAL, f"{self._kernel.arch} has no {attr.bp_type!r} breakpoints "
                                        f"(it has {', '.join(t for t in TYPES if t in f.types)})")
        if (attr.symbol_name is None) == (attr.bp_addr is None):
            raise KprobeError(E.EINVAL, "exactly one of bp_addr and symbol_name must be set")
        if attr.symbol_name is not None:
            addr = self._kernel.kallsyms_lookup_name(attr.symbol_name)
            if not addr:
                raise KprobeError(E.ENOENT, f"unknown symbol {attr.symbol_name!r}")
        else:
            addr = attr.bp_addr
        n = attr.bp_len
        if attr.bp_type == "x":
            if n != f.inst_len:
                raise KprobeError(E.EINVAL, f"an instruction breakpoint on {self._kernel.arch} has "
                                            f"bp_len {f.inst_len}, not {n}")
            if addr % (self._kernel.backend.fixed_insn_len or 1):
                raise KprobeError(E.EINVAL, f"{addr:#x} is not an instruction address")
        else:
            if n not in f.lengths:
                raise KprobeError(E.EINVAL, f"bp_len {n} is not one of "
                                            f"{', '.join(map(str, sorted(f.lengths)))} on "
                                            f"{self._kernel.arch}")
            if f.align_to_len and addr % n:
                raise KprobeError(E.EINVAL, f"{addr:#x} is not aligned to bp_len {n}")
            if addr % f.window + n > f.window:
                raise KprobeError(E.EINVAL, f"{addr:#x}/{n} crosses an aligned {f.window}-byte "
                                            f"unit")
        if self._kernel.region_of(addr) is None:
            raise KprobeError(E.EINVAL, f"{addr:#x} is not mapped")
        return addr, self.facts.pool_of(attr.bp_type)

    async def _remove(self, bps: list[HwBreakpoint], unregister: bool = True) -> None:
        """Off every CPU that holds one of `bps`, by cross-CPU calls; return when done."""
        def off(cpu):
            for bp in bps:
                self.debugregs[cpu.id].uninstall(bp)
        await self._cross_call([r.cpu for r in self.debugregs
                                if any(r.holds(bp) for bp in bps)], off)
        if unregister:
            for bp in bps:
                bp.registered = False

    async def _reload_task(self, task) -> None:
        """The task's CPU, if it is running, loads its breakpoints again."""
        def reload(cpu):
            if cpu.current is task:
                regs = self.debugregs[cpu.id]
                regs.load_task(None)
                regs.load_task(task)
        cpus = [c for c in self._kernel.cpus if c.current is task]
        await self._cross_call(cpus, reload)

    async def _cross_call(self, cpus: list["CPU"], func: Callable[["CPU"], None]) -> None:
        """Run func on each of `cpus` by cross-CPU calls.  Shielded: a registration or an
        unregistration is never left half done by a cancellation (it takes effect when
        the caller reaches its next checkpoint)."""
        with trio.CancelScope(shield=True):
            await self._kernel.smp_call_function_many(cpus, func)

    def _sched_in(self, cpu: "CPU", task) -> None:
        """A task's breakpoints follow it: off the CPU it left (the sched-out it had there),
        into the registers of the CPU it runs on now."""
        if not self._user:
            return
        regs = self.debugregs[cpu.id]
        for other in self.debugregs:
            if other is not regs and other.task is task:
                other.load_task(None)
        if regs.task is not task:
            regs.load_task(task)

    def _task_exit(self, task) -> None:
        for regs in self.debugregs:
            if regs.task is task:
                regs.load_task(None)

    def slot_warning(self, cpu: "CPU", bp: HwBreakpoint) -> None:
        msg = f"Can't find any breakpoint slot on CPU {cpu.id} for {bp!r}"
        self.warnings.append(msg)
        self._kernel.printk(msg)

    # == the debug exception ==============================================================
    def trigger(self, cpu: "CPU", bp: HwBreakpoint, addr: int, access: str, pc: int,
                store: tuple[int, int] | None) -> None:
        """A watched access on `cpu` (called from its hook, before the access): run the
        handler before the access (arm, arm64) or after it (x86, ppc; a store is made
        first, and `regs.ip` is the next instruction)."""
        m = self._kernel
        if not bp.registered:
            self.stale_triggers.append((cpu.id, bp))
        ip = pc
        debugregs = self.debugregs[cpu.id]
        if self.facts.trap_after and access != "x":
            if store is not None:
                size, value = store
                self._kernel.poke(addr, (value & ((1 << 8 * size) - 1)).to_bytes(size, self._endian))
            ip = debugregs.next_ip(pc)
        bp.hits += 1
        cpu.intra += TRAP_COST_NS
        m.trace_event("bp_hit", cpu.id, bp.addr, addr, access,
                      "trap" if ip != pc else "fault", cpu.clock + cpu.intra)
        regs = debugregs.Regs(cpu, ip)
        cpu.preempt_count += 1
        try:
            bp.triggered(bp, TriggerData(addr, cpu.id, access, pc), regs)
        except BaseException as exc:
            cpu.preempt_count -= 1
            m.kill_current(cpu, f"exception in the handler of {bp!r}: "
                                f"{type(exc).__name__}: {exc}")
            return
        cpu.preempt_count -= 1
        regs.flush_except_pc()

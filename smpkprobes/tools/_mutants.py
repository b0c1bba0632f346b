"""Known probe-core bugs, one per mutant, to check that the stress suite catches them.

A mutant is a subclass of the probe core, `KprobesSubsystem`, that overrides one part with
the bug (or, for one, a configuration of the machine).  `Machine(probe_core=...)` is the
seam that builds a machine with it; `machine_options(name)` gives the options.  Nothing is
patched: the runtime classes, and every other machine, are untouched, and production code
carries no mutant flags.

Each mutant names the stress scenarios expected to catch it (`hunted_by`);
`smpkprobes selftest --mutants` runs them over seeds until one fails and prints the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq

import trio
from dataclasses import dataclass


from ..hw_breakpoint._core import HwBreakpointSubsystem
from ..kprobes._core import KprobesSubsystem, Status
from ..kprobes._events import KprobesArmed
from ..kprobes._optcheck import NotOptimizable, prepare_region
from ..kprobes._optprobe import Optimizer
from ..kprobes._slots import InsnSlots
from ..machine._services import HANDLED, QuantumEnded


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str                          # what is broken, in the kernel's words
    hunted_by: tuple[str, ...]        # the stress scenarios expected to catch it
    probe_core: type[KprobesSubsystem] = KprobesSubsystem
    options: tuple[tuple[str, object], ...] = ()      # machine options besides
    hw_breakpoint_core: type[HwBreakpointSubsystem] = HwBreakpointSubsystem
    livelock: bool = False            # caught only by a run's wall-clock bound


# -- the mutants --------------------------------------------------------------------------
class _Kernel:
    """The probe core's view of the machine, with one service changed (a mutant's own)."""

    def __init__(self, kernel, **changed):
        self._inner = kernel
        self.__dict__.update(changed)

    def __getattr__(self, name):
        return getattr(self._inner, name)


async def _no_wait() -> None:
    # Still a checkpoint, as the real synchronize() is: without one, the host task goes on
    # in the same trio batch, and trio's random batch order leaks into the run.
    await trio.lowlevel.checkpoint()


class NoGracePeriod(KprobesSubsystem):
    """Unregistering frees the slots and returns without waiting for a grace period."""

    def __init__(self, kernel):
        super().__init__(kernel)
        self._real_kernel = kernel
        self._no_gp_kernel = _Kernel(kernel, synchronize=_no_wait)

    async def _unregister_many(self, probes):
        self._kernel = self._no_gp_kernel
        try:
            await super()._unregister_many(probes)
        finally:
            self._kernel = self._real_kernel


class _SlotsReusedAtOnce(InsnSlots):
    def reuse_at_once(self, slot: int) -> None:
        self._used.discard(slot)
        heapq.heappush(self._free, slot)


class SlotReusedAtOnce(KprobesSubsystem):
    """A dying probe's slot goes back to the allocator as soon as the probe is unlinked,
    before the grace period (and without the dirty-slot delay): reusable at once while a
    CPU may still be stepping in it."""

    def __init__(self, kernel):
        super().__init__(kernel)
        self.slots = _SlotsReusedAtOnce(kernel.insn_slot_area, self._backend.slot_size,
                                        kernel.synchronize, self._cpu_in_range)

    async def _unregister_many(self, probes):
        leaving: dict[int, set[int]] = {}
        for p in probes:
            site = self.get_kprobe(p.addr) if p._registered else None
            if site is not None and p in site.children:
                leaving.setdefault(site.addr, set()).add(id(p))
        for addr, ids in leaving.items():
            site = self.get_kprobe(addr)
            if site.slot is not None and all(id(c) in ids for c in site.children):
                del self._by_slot[site.slot]
                self.slots.reuse_at_once(site.slot)
                site.set_slot(None)
        await super()._unregister_many(probes)


class PoolNotAtomic(KprobesSubsystem):
    """Taking a kretprobe instance is a plain read then a write that other CPUs see only
    later (no lock): the take sits in the taking CPU's store buffer until the end of that
    CPU's next quantum (or until its task leaves it), and meanwhile the other CPUs still
    see the instance on the free list and can take it too."""

    def __init__(self, kernel):
        super().__init__(kernel)
        self._buffers = {c.id: [] for c in kernel.cpus}
        kernel.subscribe(QuantumEnded, self._commit, first=True)   # before the checks

    def _commit(self, event):
        cpu = event.cpu
        keep = []
        for owner, ri, quantum in self._buffers[cpu.id]:
            if quantum == cpu.quanta and cpu.current is not None:
                keep.append((owner, ri, quantum))     # taken in this quantum
            elif ri in owner.pool.free:
                owner.pool.free.remove(ri)
        self._buffers[cpu.id][:] = keep

    def pre_handler_kretprobe(self, p, regs):
        rp, cpu = p._owner, regs.cpu
        mine = self._buffers[cpu.id]
        real = rp.pool.free
        view = list(real)               # what this CPU sees: its own pops applied
        for owner, ri, _ in mine:
            if owner is rp:
                for i, x in enumerate(view):
                    if x is ri:
                        del view[i]
                        break
        before = list(view)
        rp.pool.free = view
        try:
            return super().pre_handler_kretprobe(p, regs)
        finally:
            rp.pool.free = real
            # The take pops the end of the list.  The pop stays in this CPU's store buffer;
            # a push (a take the entry handler refused) is visible to all at once.
            if len(view) < len(before):
                mine.extend((rp, ri, cpu.quanta) for ri in before[len(view):])
            elif len(view) > len(before):
                real.extend(view[len(before):])


class NoPrevKprobeSave(KprobesSubsystem):
    """A reentrant hit does not save the running probe into prev_kprobe: restoring after
    the nested step brings back an empty control block."""

    def reenter_kprobe(self, cpu, kcb, p):
        result = super().reenter_kprobe(cpu, kcb, p)
        if kcb.prev_kprobe is not None and kcb.kprobe_status is Status.REENTER:
            kcb.prev_kprobe = (None, Status.NONE, 0)
        return result


class OrphansNotHandled(KprobesSubsystem):
    """Unregistering a kretprobe leaves its in-flight instances pointing at it: their
    returns still run its handler."""

    def _cleanup_kretprobe(self, rp):
        rp.pool.free = []


class NoBackupOnStrayTrap(KprobesSubsystem):
    """A trap whose breakpoint is already gone resumes where the trap left the PC (past
    the int3) instead of backing up to re-execute the original instruction."""

    def _stray_trap(self, cpu, addr):
        super()._stray_trap(cpu, addr)
        cpu.pc = addr + self._backend.unicorn.trap_pc_offset
        return HANDLED


class BatchRegisterNoRollback(KprobesSubsystem):
    """A batch registration that fails half-way leaves the probes before the failure
    registered."""

    _in_batch = False

    async def _register_batch(self, items, register_one):
        self._in_batch = True
        try:
            await super()._register_batch(items, register_one)
        finally:
            self._in_batch = False

    async def _unregister_many(self, probes):
        if not self._in_batch:          # the rollback's only tool
            await super()._unregister_many(probes)


class DisableDisarmsAggregate(KprobesSubsystem):
    """disable_kprobe on one child of an aggregate disarms the whole site, though other
    children are still enabled (the arming law: armed iff kprobes are enabled and some
    child is enabled and not gone)."""

    async def disable_kprobe(self, p):
        await super().disable_kprobe(p)
        site = self._kprobe_table.get(p.addr) if p._registered else None
        if site is not None and site.armed:
            async with self._mutex:
                await self.disarm_kprobes([site])


class ArmWithoutSync(KprobesSubsystem):
    """Arming writes the breakpoints but sends no IPI: a CPU keeps running its stale
    translation of the probed code after register returns, so calls that enter after the
    registration are neither hit nor missed.  (Disarming still syncs.)"""

    async def arm_kprobes(self, sites):
        for s in sites:
            s.armed = True
            self._kernel.poke(s.addr, self._bp)
        self.events.publish(KprobesArmed(sites))


class ShortGracePeriod(KprobesSubsystem):
    """The grace period waits only for CPUs executing in an instruction slot: a CPU inside
    a handler (preemption disabled; say, in a nested guest call) counts as quiescent, so
    unregister can return while that handler still runs."""

    def __init__(self, kernel):
        super().__init__(kernel)
        lo, hi = kernel.insn_slot_area

        async def synchronize():
            if any(lo <= cpu.pc < hi for cpu in kernel.cpus):
                await kernel.synchronize()
            else:
                await _no_wait()        # a checkpoint still (see _no_wait)
        self._kernel = _Kernel(kernel, synchronize=synchronize)


class GracePeriodNeverEnds(KprobesSubsystem):
    """A quiescent state is never reported: each time a grace period ends, unregistration
    waits for another, for ever, while the CPUs keep running.  A livelock: no guest call
    runs away and the wait is shielded from cancellation, so only the run's bounds end it
    (tools/_bounds.py: `panic` stops the machine and wakes the wait)."""

    def __init__(self, kernel):
        super().__init__(kernel)

        async def synchronize():
            while True:
                await kernel.synchronize()
                await trio.lowlevel.checkpoint()
        self._kernel = _Kernel(kernel, synchronize=synchronize)


class WideBreakpointLocalOnly(HwBreakpointSubsystem):
    """register_wide_hw_breakpoint installs the breakpoint in the local CPU's debug
    registers only (CPU 0's), with no cross-CPU call to the others."""

    def _wide_cpus(self):
        return [self._kernel.cpus[0]]


class SlotNotMovedWithTask(HwBreakpointSubsystem):
    """A per-task breakpoint is loaded into the registers of the first CPU its task runs on
    and stays there: not moved at context switch when the task migrates."""

    def _sched_in(self, cpu, task):
        regs = self.debugregs[cpu.id]
        if self._user and regs.task is None and all(r.task is not task for r in self.debugregs):
            regs.load_task(task)
# -- jump optimization (kprobes/_optprobe.py): the optimizer is the probe core's own part,
# made by `_make_optimizer`, so each of these is a probe core with a broken optimizer.
class _OptNoGracePeriod(Optimizer):
    def _step(self):
        for _ in range(2):
            b = self._batch
            if b is not None and b.phase == "gp":
                b.remaining = set()
                b.ranges = []
            super()._step()


class OptNoGracePeriod(KprobesSubsystem):
    """The optimizer writes its jumps without waiting for a grace period, nor for the tasks
    preempted inside the regions (RCU tasks)."""

    def _make_optimizer(self, kernel):
        return _OptNoGracePeriod(self, kernel)


class _OptNoInt3First(Optimizer):
    def _poke(self, b, phase):
        n = len(self._bp)
        if self.facts.jump_len == n:
            return super()._poke(b, phase)
        ops = [op for op in b.ops if op.state == "queued"]
        b.phase = phase
        if phase == "int3":
            patches = [(op.site.addr, op.jump[:n]) for op in ops]
        elif phase == "tail":
            patches = [(op.site.addr + n, op.jump[n:]) for op in ops]
            for op in ops:
                op.written = True
                self._kernel.code_written(op.site.addr, op.jump)
        else:
            patches = []
        b.pending = self._kernel.text_poke_start(patches)[1] if patches else []


class OptNoInt3First(KprobesSubsystem):
    """The jump is written without a breakpoint guarding it (no text_poke_bp): its first
    byte, then its tail, each with a sync, as a plain copy would, so for a while the text
    holds a jump opcode with the old bytes as its displacement."""

    def _make_optimizer(self, kernel):
        return _OptNoInt3First(self, kernel)


class _OptFreeWithoutGracePeriod(Optimizer):
    async def unoptimize(self, ops):
        await super().unoptimize(ops)
        for op in ops:
            if op in self._free_list:
                self._free_list.remove(op)
                del self._by_stub[op.stub]
                self._free_index.append(op.index)


class OptFreeWithoutGracePeriod(KprobesSubsystem):
    """An unoptimized probe's detour is freed, and may be reused, at once."""

    def _make_optimizer(self, kernel):
        return _OptFreeWithoutGracePeriod(self, kernel)


class _OptNoJumpTargetCheck(Optimizer):
    def region(self, addr):
        r = self._regions.get(addr)
        if r is None:
            sym = self._kernel.kallsyms.containing(addr)
            facts = dataclasses.replace(self.facts, scan_function=False)
            try:
                r = prepare_region(self._backend, facts, self._k.original_text, sym.addr,
                                   sym.size, addr)
            except NotOptimizable as err:
                r = err.reason
            self._regions[addr] = r
        return r


class OptNoJumpTargetCheck(KprobesSubsystem):
    """The safety checks do not decode the function: a region that a jump lands inside, or
    that an indirect jump may reach, is optimized all the same."""

    def _make_optimizer(self, kernel):
        return _OptNoJumpTargetCheck(self, kernel)


MUTANTS: dict[str, Mutant] = {m.name: m for m in (
    # The machine's own "no cross-CPU sync" configuration: text_poke writes, sends no IPI.
    Mutant("no_text_sync", "no cross-CPU sync after text patching (arming, disarming)",
           ("unregister_while_firing", "concurrent_hits"), options=(("text_sync", False),)),
    Mutant("no_grace_period", "no grace period before a slot is freed",
           ("unregister_while_firing",), NoGracePeriod),
    Mutant("slot_reused_at_once", "a slot reused at once",
           ("unregister_while_firing",), SlotReusedAtOnce),
    Mutant("pool_not_atomic", "pool take/return that is not atomic",
           ("maxactive_contention", "unregister_while_firing"), PoolNotAtomic),
    Mutant("no_prev_kprobe_save", "no prev_kprobe save on reentry",
           ("reentrancy", "singlestep_state"), NoPrevKprobeSave),
    Mutant("orphans_not_handled", "orphaned kretprobe instances not handled",
           ("unregister_while_firing",), OrphansNotHandled),
    Mutant("no_backup_on_stray_trap", "no back-up on a stray trap",
           ("unregister_while_firing",), NoBackupOnStrayTrap),
    Mutant("batch_register_no_rollback", "a batch register that forgets the rollback",
           ("unregister_while_firing",), BatchRegisterNoRollback),
    # The laws of the race-finding round, each with the scenario built to catch it.
    Mutant("disable_disarms_aggregate", "disabling one child disarms the whole aggregate",
           ("aggregate_churn",), DisableDisarmsAggregate),
    Mutant("arm_without_sync", "arming without the cross-CPU sync (stale translations)",
           ("aggregate_churn",), ArmWithoutSync),
    Mutant("short_grace_period", "a grace period that ignores CPUs inside handlers",
           ("long_context_unregister",), ShortGracePeriod),
    Mutant("grace_period_never_ends", "a grace period that never ends (a livelock)",
           ("unregister_while_firing",), GracePeriodNeverEnds, livelock=True),
    Mutant("wide_breakpoint_local_only", "a wide hardware breakpoint installed on the local "
           "CPU only", ("data_breakpoint", "watchpoint_race"),
           hw_breakpoint_core=WideBreakpointLocalOnly),
    Mutant("slot_not_moved_with_task", "a per-task breakpoint's slot not moved with its "
           "migrating task", ("watchpoint_race",), hw_breakpoint_core=SlotNotMovedWithTask),
    Mutant("opt_no_grace_period", "optimizing without a grace period (nor RCU tasks)",
           ("optprobe_race",), OptNoGracePeriod),
    Mutant("opt_no_int3_first", "a jump written without the int3-first protocol",
           ("optprobe_race",), OptNoInt3First),
    Mutant("opt_free_without_grace_period", "a detour buffer freed without a grace period",
           ("optprobe_race",), OptFreeWithoutGracePeriod),
    Mutant("opt_no_jump_target_check", "optimizing without the jump-target check",
           ("optprobe_race",), OptNoJumpTargetCheck),
)}


def names() -> list[str]:
    return list(MUTANTS)


def get(name: str) -> Mutant:
    try:
        return MUTANTS[name]
    except KeyError:
        raise ValueError(f"no mutant {name!r}; known: {', '.join(MUTANTS)}") from None


def machine_options(name: str | None) -> dict:
    """The `Machine` options that build a machine with mutant `name` (none for None)."""
    if name is None:
        return {}
    mutant = get(name)
    return {"probe_core": mutant.probe_core, "hw_breakpoint_core": mutant.hw_breakpoint_core,
            **dict(mutant.options)}


@contextlib.contextmanager
def injected(name: str | None):
    """The mutant `name` (None for none), checked: pass `machine_options(name)` to the
    machines built in the block.  Kept for callers written when mutants were patches."""
    yield None if name is None else get(name)

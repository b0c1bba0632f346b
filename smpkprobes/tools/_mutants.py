"""Known probe-core bugs, injected one at a time, to check that the stress suite catches them.

A mutant is a monkeypatch of the probe core's (or the machine's) classes, applied with
`injected(name)` and undone on exit; production code carries no mutant flags.  Patches go on
the classes, so they must be in place before a `Machine` is built (a machine binds some
methods, such as its trap handler, when it boots).

Each mutant names the stress scenarios expected to catch it (`hunted_by`);
`smpkprobes selftest --mutants` runs them over seeds until one fails and prints the table.
"""

from __future__ import annotations

import contextlib
import heapq
from dataclasses import dataclass
from typing import Callable

from ..kprobes import _optcheck
from ..kprobes._core import KprobesSubsystem, Status
from ..kprobes._optprobe import Optimizer
from ..machine._machine import SMPMachine


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str                          # what is broken, in the kernel's words
    hunted_by: tuple[str, ...]        # the stress scenarios expected to catch it
    apply: Callable[[], Callable[[], None]]    # patch; returns the undo


def _patch(cls, attr: str, new) -> Callable[[], None]:
    if attr in cls.__dict__:
        old = cls.__dict__[attr]
        setattr(cls, attr, new)
        return lambda: setattr(cls, attr, old)
    setattr(cls, attr, new)                 # shadows the method a mixin gives the class
    return lambda: delattr(cls, attr)


# -- the mutants --------------------------------------------------------------------------
def _no_text_sync():
    """Arming and disarming write the text but send no IPI: CPUs keep stale translations."""
    undo = []
    for attr in ("_arm", "_disarm"):
        orig = getattr(KprobesSubsystem, attr)

        async def unsynced(self, sites, _orig=orig):
            saved, self._m.text_sync = self._m.text_sync, False
            try:
                await _orig(self, sites)
            finally:
                self._m.text_sync = saved
        undo.append(_patch(KprobesSubsystem, attr, unsynced))
    return lambda: [u() for u in undo]


async def _no_wait() -> None:
    return None


def _no_grace_period():
    """Unregistering frees the slots and returns without waiting for a grace period."""
    orig = KprobesSubsystem._unregister_many

    async def unregister_many(self, probes):
        self._m.synchronize = _no_wait          # shadows the method on this machine only
        try:
            await orig(self, probes)
        finally:
            del self._m.synchronize
    return _patch(KprobesSubsystem, "_unregister_many", unregister_many)


def _slot_reused_at_once():
    """A dying probe's slot goes back to the allocator as soon as the probe is unlinked,
    before the grace period (and without the dirty-slot delay): reusable at once while a
    CPU may still be stepping in it."""
    orig = KprobesSubsystem._unregister_many

    async def unregister_many(self, probes):
        leaving: dict[int, set[int]] = {}
        for p in probes:
            site = self._table.get(p.addr) if p._registered else None
            if site is not None and p in site.children:
                leaving.setdefault(site.addr, set()).add(id(p))
        for addr, ids in leaving.items():
            site = self._table[addr]
            if site.slot is not None and all(id(c) in ids for c in site.children):
                del self._by_slot[site.slot]
                self.slots._used.discard(site.slot)
                heapq.heappush(self.slots._free, site.slot)
                site.slot = None
        await orig(self, probes)
    return _patch(KprobesSubsystem, "_unregister_many", unregister_many)


def _pool_not_atomic():
    """Taking a kretprobe instance is a plain read then a write that other CPUs see only
    later (no lock): the take sits in the taking CPU's store buffer until the end of that
    CPU's next quantum (or until its task leaves it), and meanwhile the other CPUs still
    see the instance on the free list and can take it too."""
    orig = KprobesSubsystem._pre_handler_kretprobe

    def pre_handler(self, p, regs):
        rp, cpu, m = p._owner, regs.cpu, self._m
        buffers = m.__dict__.get("_mutant_store_buffers")
        if buffers is None:
            buffers = m._mutant_store_buffers = {c.id: [] for c in m.cpus}

            def commit(cpu):
                keep = []
                for owner, ri, quantum in buffers[cpu.id]:
                    if quantum == cpu.quanta and cpu.current is not None:
                        keep.append((owner, ri, quantum))     # taken in this quantum
                    elif ri in owner._free:
                        owner._free.remove(ri)
                buffers[cpu.id][:] = keep
            m.quantum_notifiers.insert(0, commit)     # drain before the invariant checks
        mine = buffers[cpu.id]
        real = rp._free
        view = list(real)               # what this CPU sees: its own pops applied
        for owner, ri, _ in mine:
            if owner is rp:
                for i, x in enumerate(view):
                    if x is ri:
                        del view[i]
                        break
        before = list(view)
        rp._free = view
        try:
            return orig(self, p, regs)
        finally:
            rp._free = real
            # The take pops the end of the list.  The pop stays in this CPU's store buffer;
            # a push (a take the entry handler refused) is visible to all at once.
            if len(view) < len(before):
                mine.extend((rp, ri, cpu.quanta) for ri in before[len(view):])
            elif len(view) > len(before):
                real.extend(view[len(before):])
    return _patch(KprobesSubsystem, "_pre_handler_kretprobe", pre_handler)


def _no_prev_kprobe_save():
    """A reentrant hit does not save the running probe into prev_kprobe: restoring after
    the nested step brings back an empty control block."""
    orig = KprobesSubsystem._reenter_kprobe

    def reenter(self, cpu, kcb, site):
        orig(self, cpu, kcb, site)
        if kcb.prev is not None and kcb.status is Status.REENTER:
            kcb.prev = (None, Status.NONE, 0)
    return _patch(KprobesSubsystem, "_reenter_kprobe", reenter)


def _orphans_not_handled():
    """Unregistering a kretprobe leaves its in-flight instances pointing at it: their
    returns still run its handler."""
    def cleanup(self, rp):
        rp._free = []
    return _patch(KprobesSubsystem, "_cleanup_kretprobe", cleanup)


def _no_backup_on_stray_trap():
    """A trap whose breakpoint is already gone resumes where the trap left the PC (past
    the int3) instead of backing up to re-execute the original instruction."""
    orig = KprobesSubsystem._kprobe_handler

    def handler(self, cpu, addr):
        strays = self._m._c.stray_traps
        handled = orig(self, cpu, addr)
        if self._m._c.stray_traps != strays:
            cpu.pc = addr + self._backend.unicorn.trap_pc_offset
        return handled
    return _patch(KprobesSubsystem, "_kprobe_handler", handler)


def _batch_register_no_rollback():
    """A batch registration that fails half-way leaves the probes before the failure
    registered."""
    orig = KprobesSubsystem._register_batch

    async def register_batch(self, items, register_one):
        async def keep(probes):
            return None
        self._unregister_many = keep            # the rollback's only tool, on this instance
        try:
            await orig(self, items, register_one)
        finally:
            del self._unregister_many
    return _patch(KprobesSubsystem, "_register_batch", register_batch)


# -- jump optimization (kprobes/_optprobe.py) ----------------------------------------------
def _opt_no_grace_period():
    """The optimizer writes its jumps without waiting for a grace period, nor for the tasks
    preempted inside the regions (RCU tasks)."""
    orig = Optimizer._step

    def step(self):
        b = self._batch
        if b is not None and b.phase == "gp":
            b.remaining = set()
            b.ranges = []
        orig(self)
        b = self._batch
        if b is not None and b.phase == "gp" and b.ops:
            b.remaining = set()
            b.ranges = []
            orig(self)
    return _patch(Optimizer, "_step", step)


def _opt_no_int3_first():
    """The jump is written without a breakpoint guarding it (no text_poke_bp): its first
    byte, then its tail, each with a sync, as a plain copy would, so for a while the text
    holds a jump opcode with the old bytes as its displacement."""
    orig = Optimizer._poke

    def poke(self, b, phase):
        n = len(self._k._bp)
        if self.facts.jump_len == n:
            return orig(self, b, phase)
        ops = [op for op in b.ops if op.state == "queued"]
        b.phase = phase
        if phase == "int3":
            patches = [(op.site.addr, op.jump[:n]) for op in ops]
        elif phase == "tail":
            patches = [(op.site.addr + n, op.jump[n:]) for op in ops]
            for op in ops:
                op.written = True
                self._m.insn_starts.code_written(op.site.addr, op.jump)
        else:
            patches = []
        b.pending = self._m.text_poke_start(patches)[1] if patches else []
    return _patch(Optimizer, "_poke", poke)


def _opt_free_without_grace_period():
    """An unoptimized probe's detour is freed, and may be reused, at once."""
    orig = Optimizer.unoptimize

    async def unoptimize(self, ops):
        await orig(self, ops)
        for op in ops:
            if op in self._free_list:
                self._free_list.remove(op)
                del self._by_stub[op.stub]
                self._free_index.append(op.index)
    return _patch(Optimizer, "unoptimize", unoptimize)


def _opt_no_jump_target_check():
    """The safety checks do not decode the function: a region that a jump lands inside, or
    that an indirect jump may reach, is optimized all the same."""
    def scan(backend, code, func, addr, region_end):
        return None
    return _patch(_optcheck, "_scan", scan)


MUTANTS: dict[str, Mutant] = {m.name: m for m in (
    Mutant("no_text_sync", "no cross-CPU sync after arming or disarming",
           ("unregister_while_firing", "concurrent_hits"), _no_text_sync),
    Mutant("no_grace_period", "no grace period before a slot is freed",
           ("unregister_while_firing",), _no_grace_period),
    Mutant("slot_reused_at_once", "a slot reused at once",
           ("unregister_while_firing",), _slot_reused_at_once),
    Mutant("pool_not_atomic", "pool take/return that is not atomic",
           ("maxactive_contention", "unregister_while_firing"), _pool_not_atomic),
    Mutant("no_prev_kprobe_save", "no prev_kprobe save on reentry",
           ("reentrancy", "singlestep_state"), _no_prev_kprobe_save),
    Mutant("orphans_not_handled", "orphaned kretprobe instances not handled",
           ("unregister_while_firing",), _orphans_not_handled),
    Mutant("no_backup_on_stray_trap", "no back-up on a stray trap",
           ("unregister_while_firing",), _no_backup_on_stray_trap),
    Mutant("batch_register_no_rollback", "a batch register that forgets the rollback",
           ("unregister_while_firing",), _batch_register_no_rollback),
    Mutant("opt_no_grace_period", "optimizing without a grace period (nor RCU tasks)",
           ("optprobe_race",), _opt_no_grace_period),
    Mutant("opt_no_int3_first", "a jump written without the int3-first protocol",
           ("optprobe_race",), _opt_no_int3_first),
    Mutant("opt_free_without_grace_period", "a detour buffer freed without a grace period",
           ("optprobe_race",), _opt_free_without_grace_period),
    Mutant("opt_no_jump_target_check", "optimizing without the jump-target check",
           ("optprobe_race",), _opt_no_jump_target_check),
)}


def names() -> list[str]:
    return list(MUTANTS)


@contextlib.contextmanager
def injected(name: str | None):
    """Inject mutant `name` for the duration of the block (no-op for None)."""
    if name is None:
        yield None
        return
    try:
        mutant = MUTANTS[name]
    except KeyError:
        raise ValueError(f"no mutant {name!r}; known: {', '.join(MUTANTS)}") from None
    undo = mutant.apply()
    try:
        yield mutant
    finally:
        undo()

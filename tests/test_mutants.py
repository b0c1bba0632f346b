"""Checking the checkers: the always-on invariants, and the mutation check of the stress suite."""

import functools
import re

import pytest
import trio

from smpkprobes import Kprobe, Kretprobe, Machine, SimulationError
from smpkprobes.machine import _memory as mem
from smpkprobes.tools import _mutants
from smpkprobes.tools import _stress
from smpkprobes.tools._invariants import InvariantViolation
from smpkprobes.kprobes._core import KprobesSubsystem
from smpkprobes.machine._machine import SMPMachine


# -- the invariants ------------------------------------------------------------------------
async def test_invariants_leave_the_run_unchanged():
    """The checks only read: a run with them is the same run, event for event."""
    async def digest(inv):
        async with Machine(cpus=4, seed=9, invariants=inv) as m:
            kp = Kprobe(symbol_name="do_fork", pre_handler=lambda p, r: 0)
            await m.kprobes.register_kprobe(kp)
            async with trio.open_nursery() as n:
                for c in range(4):
                    n.start_soon(functools.partial(m.call, "fork_loop", 50, cpu=c))
            await m.kprobes.unregister_kprobe(kp)
        return m.trace_digest(), m.invariants.checks if m.invariants else 0
    (on, checks), (off, _) = await digest("raise"), await digest(False)
    assert on == off and checks > 0


async def test_a_clobbered_disarmed_address_is_a_text_violation():
    """Text at an unregistered probe's address that differs from the original is reported,
    and leaving the machine raises InvariantViolation, a SimulationError."""
    with pytest.raises(InvariantViolation, match=r"text: disarmed probe address kprobe_target"):
        async with Machine(cpus=1) as m:
            kp = Kprobe(symbol_name="kprobe_target")
            await m.kprobes.register_kprobe(kp)
            await m.kprobes.unregister_kprobe(kp)
            m.write_memory(kp.addr, b"\x90")
    assert issubclass(InvariantViolation, SimulationError)


async def test_a_cpu_in_a_free_slot_is_a_slot_violation():
    """A CPU running at an address of an unallocated instruction slot is reported."""
    async with Machine(cpus=1, invariants="record") as m:
        cpu = m.cpus[0]
        cpu.current, cpu.pc = object(), mem.SLOTS.start + 8
        m.invariants.check_slots()
        cpu.current = None
    assert m.invariants.violations == [f"slots: cpu0 executes at {mem.SLOTS.start + 8:#x} in "
                                       f"insn slot {mem.SLOTS.start:#x}, which is free"]


async def test_a_lost_instance_is_a_pool_violation():
    """free + in use != maxactive is reported at the next quantum."""
    async with Machine(cpus=1, invariants="record") as m:
        rp = Kretprobe(symbol_name="kprobe_target", maxactive=3)
        await m.kprobes.register_kretprobe(rp)
        rp.pool.free.pop()
        await m.call("kprobe_target", 3)
        await m.kprobes.unregister_kretprobe(rp)
    assert "pool: <Kretprobe kprobe_target>: free 2 + in use 0 != maxactive 3" in \
        m.invariants.violations


async def test_an_uncounted_entry_is_an_entries_violation():
    """taken + nmissed must equal the entries into the kretprobe's function."""
    async with Machine(cpus=1, invariants="record") as m:
        rp = Kretprobe(symbol_name="kprobe_target", maxactive=1)
        await m.kprobes.register_kretprobe(rp)
        await m.call("kprobe_target", 3)
        rp.nmissed += 1
        await m.call("kprobe_target", 3)
        await m.kprobes.unregister_kretprobe(rp)
    assert any(v.startswith("entries: <Kretprobe kprobe_target>: taken 2 + nmissed 1 != "
                            "entries 2") for v in m.invariants.violations)


async def test_a_return_handler_after_unregister_is_a_handlers_violation():
    """With orphans not handled, a call asleep at unregister runs the handler later: caught."""
    async with Machine(cpus=2, seed=1, invariants="record",
                       **_mutants.machine_options("orphans_not_handled")) as m:
        rp = Kretprobe(symbol_name="sleepy", handler=lambda ri, r: 0)
        await m.kprobes.register_kretprobe(rp)
        async with trio.open_nursery() as n:
            n.start_soon(m.call, "sleepy", 1)
            await m.call("fork_loop", 2000)       # sleepy is asleep inside meanwhile
            await m.kprobes.unregister_kretprobe(rp)
    assert m.invariants.violations == ["handlers: return handler of <Kretprobe sleepy> about "
                                       "to run after unregister_kretprobe returned"]


async def test_a_trap_that_neither_hits_nor_misses_is_an_entries_violation():
    """A trap at a probe that is counted as no hit and no miss is reported after its
    quantum, naming the quantum and the CPU."""
    def uncount(p, regs):
        m.kprobes.hits -= 1              # as if the hit path forgot to count this hit
    async with Machine(cpus=1, seed=1, invariants="record") as m:
        kp = Kprobe(symbol_name="kprobe_target", pre_handler=uncount)
        await m.kprobes.register_kprobe(kp)
        await m.call("kprobe_target", 3)
        await m.kprobes.unregister_kprobe(kp)
    [v] = m.invariants.violations
    assert re.fullmatch(r"entries: 1 trap\(s\) at a probed address in quantum \d+ of cpu0 ended "
                        r"as neither a hit nor a miss", v)


@pytest.mark.parametrize("post", [False, True])
async def test_a_handler_after_unregister_is_a_handlers_violation(post):
    """A probe still linked at its address after it was unregistered: its pre_handler, or
    its post_handler after the single-step, about to run is reported."""
    async with Machine(cpus=1, seed=1, trap_delay=0, invariants="record") as m:
        kp = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: 0,
                    post_handler=(lambda p, r, f: None) if post else None)
        await m.kprobes.register_kprobe(kp)
        kp._registered = False           # as if unregister had returned and left it linked
        await m.call("kprobe_target", 3)
        kp._registered = True
        await m.kprobes.unregister_kprobe(kp)
    which = ["pre_handler", "post_handler"] if post else ["pre_handler"]
    assert m.invariants.violations == [f"handlers: {w} of <Kprobe kprobe_target+0x0> at "
                                       f"kprobe_target+0x0 about to run after it was "
                                       f"unregistered" for w in which]


# -- the mutation check ------------------------------------------------------------------------
async def test_a_mutant_changes_only_its_own_machine():
    """A mutant is a probe core subclass handed to one Machine: the runtime classes, and a
    machine built beside it, are untouched."""
    before = {k: dict(vars(c)) for k, c in (("k", KprobesSubsystem), ("m", SMPMachine))}
    for name in _mutants.names():
        options = _mutants.machine_options(name)
        async with Machine(cpus=1, **options) as mutated, Machine(cpus=1) as plain:
            assert isinstance(mutated.kprobes, options["probe_core"])
            assert type(plain.kprobes) is KprobesSubsystem and plain.text_sync
    after = {k: dict(vars(c)) for k, c in (("k", KprobesSubsystem), ("m", SMPMachine))}
    assert before == after
    with pytest.raises(ValueError, match="no mutant 'nope'"):
        _mutants.machine_options("nope")


def test_every_mutant_is_caught_within_a_few_seeds():
    """Each known probe-core bug, injected alone, fails a stress scenario within 3 seeds;
    the same seeds pass without it."""
    results = _stress.mutation_check(max_seeds=3, progress=False, timeout=60)
    table = {r.mutant: (r.caught, r.scenario, r.seeds_needed) for r in results}
    assert sorted(table) == sorted(_mutants.names())
    assert all(r.caught for r in results), table
    for r in results:
        clean = _stress.run_seeds(r.scenario, [], range(r.seeds_needed), progress=False)
        assert all(o.ok for o in clean), (r.scenario, [o.failures for o in clean])


def test_a_mutant_failure_replays_exactly():
    """The replay command printed for a failing seed reproduces the same failure."""
    argv = _stress.seed_argv(["--mutant", "slot_reused_at_once"], 0)
    first = _stress.run_once("unregister_while_firing", argv)
    again = _stress.run_once("unregister_while_firing", argv)
    assert not first.ok and (again.failures, again.digest) == (first.failures, first.digest)

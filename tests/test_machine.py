"""The SMP machine: determinism, text patching, tasks, preemption, oopses, runaways."""

import functools

import pytest
import trio

from smpkprobes import cpus
from smpkprobes import Kprobe, Machine, Oops, RunawayError
from smpkprobes.tools._bench import _insns_per_call


async def _workload(m, ncpu=4):
    results = {}

    async def one(func, arg, cpu):
        results[(func, arg, cpu)] = await m.call(func, arg, cpu=cpu)

    async with trio.open_nursery() as n:
        for c in range(ncpu):
            n.start_soon(one, "fork_loop", 50 + c, c)
            n.start_soon(one, "fib", 8, None)
            n.start_soon(one, "sleepy", 1, None)
    return results


async def _digest(seed, preempt=False):
    async with Machine(cpus=4, seed=seed, preempt=preempt) as m:
        kp = Kprobe(symbol_name="do_fork", pre_handler=lambda p, r: 0)
        await m.kprobes.register_kprobe(kp)
        results = await _workload(m)
        await m.kprobes.unregister_kprobe(kp)
        return m.trace_digest(), results, [e for e in m.trace if e[0] == "q"]


async def test_same_seed_same_run():
    """Two runs with one seed give the same trace digest and results, event for event."""
    a, b = await _digest(11, preempt=True), await _digest(11, preempt=True)
    assert a == b


async def test_different_seeds_interleave_differently():
    """Different seeds give different CPU interleavings (quantum sequences)."""
    runs = [await _digest(s) for s in (1, 2, 3)]
    assert len({r[0] for r in runs}) == 3
    assert len({tuple(r[2]) for r in runs}) == 3
    assert all(r[1] == runs[0][1] for r in runs)


@pytest.mark.parametrize("sync", [False, True])
async def test_stale_translation_without_sync(sync):
    """Without the cross-CPU sync a CPU keeps running its stale translation straight past a
    fresh breakpoint; with it, every call traps."""
    async with Machine(cpus=2, seed=1, text_sync=sync, trap_delay=0) as m:
        for _ in range(3):
            assert await m.call("text_poke_victim", 1, cpu=0) == 8
        hits = []
        kp = Kprobe(symbol_name="text_poke_victim", pre_handler=lambda p, r: hits.append(1))
        await m.kprobes.register_kprobe(kp)
        assert m.read_memory(kp.addr, 1) == b"\xcc"
        for _ in range(20):
            assert await m.call("text_poke_victim", 1, cpu=0) == 8
        assert len(hits) == (20 if sync else 0)


async def test_sleeping_task_lets_others_run():
    """A task sleeping in msleep frees its CPU: a later task on that CPU finishes first."""
    async with Machine(cpus=1, seed=2) as m:
        order = []

        async def run(func, arg):
            await m.call(func, arg, cpu=0)
            order.append(func)
        async with trio.open_nursery() as n:
            n.start_soon(run, "sleepy", 5)
            n.start_soon(run, "fork_loop", 100)
        assert order == ["fork_loop", "sleepy"]
        assert m.statistics().context_switches >= 3


@pytest.mark.parametrize("preempt", [False, True])
async def test_preemption_migrates_only_where_allowed(preempt):
    """With preempt=True unpinned tasks migrate between CPUs, pinned ones never do, and no
    task is switched out between a probe's pre_handler and its post_handler."""
    async with Machine(cpus=4, seed=7, preempt=preempt, preempt_prob=0.5) as m:
        seen = {}
        bad = []

        def pre(p, regs):
            if regs.cpu.preemptible():
                bad.append("preemptible in handler")
            seen[regs.cpu.current.pid] = regs.cpu.id

        def post(p, regs, flags):
            if seen.pop(regs.cpu.current.pid) != regs.cpu.id:
                bad.append("migrated between pre and post")
        kp = Kprobe(symbol_name="fib", offset=0, pre_handler=pre, post_handler=post)
        await m.kprobes.register_kprobe(kp)
        async with trio.open_nursery() as n:
            for c in range(6):
                n.start_soon(functools.partial(m.call, "fib", 12))
            n.start_soon(functools.partial(m.call, "fork_loop", 3000, cpu=2))
        assert bad == []
        st = m.statistics()
        if preempt:
            assert st.preemptions > 0 and st.migrations > 0
        else:
            assert st.preemptions == 0 and st.migrations == 0


async def test_pinned_tasks_stay_put():
    """A task pinned with cpu=N only ever runs on CPU N, even under preemption."""
    async with Machine(cpus=3, seed=4, preempt=True, preempt_prob=0.9) as m:
        async with trio.open_nursery() as n:
            for c in range(3):
                n.start_soon(functools.partial(m.call, "fib", 14, cpu=c))
        runs = [e for e in m.trace if e[0] == "run"]
        new = {e[1]: e[5] for e in m.trace if e[0] == "new"}
        assert runs and all(e[1] == new[e[2]] for e in runs)


@pytest.mark.parametrize("func,cause", [("null_deref", "UC_ERR_READ_UNMAPPED"),
                                        ("bad_insn", "UC_ERR_INSN_INVALID")])
async def test_oops_kills_only_that_task(func, cause):
    """A guest fault kills its task with a readable oops; other CPUs keep running."""
    async with Machine(cpus=2, seed=3) as m:
        result = {}

        async def other():
            result["fork"] = await m.call("fork_loop", 2000, cpu=1)
        async with trio.open_nursery() as n:
            n.start_soon(other)
            with pytest.raises(Oops, match=cause) as info:
                await m.call(func, cpu=0)
        rec = info.value.record
        assert rec.cpu == 0 and rec.comm == func and rec.symbol.startswith(func + "+")
        assert f"Comm: {func}" in rec.report and "RIP:" in rec.report
        assert result["fork"] == 2000
        assert m.oopses == [rec] and m.statistics().oopses == 1
        assert await m.call("kprobe_target", 9, cpu=0) == 3


async def test_runaway_guest_code_ends_with_clear_error():
    """A guest infinite loop ends with RunawayError once its instruction budget is spent."""
    async with Machine(cpus=2, seed=1, call_budget=200_000) as m:
        with pytest.raises(RunawayError, match="instruction budget of 200000 exhausted"):
            await m.call("infinite_loop")
        assert await m.call("fib", 5) == 5


def test_unsupported_architectures_say_why():
    """ia64 and unknown arches raise an error giving the reason."""
    with pytest.raises(cpus.UnsupportedArchError, match="no IA-64 emulator"):
        Machine(arch="ia64")
    with pytest.raises(cpus.UnsupportedArchError, match="unknown architecture"):
        Machine(arch="vax")


async def test_statistics_is_a_frozen_record():
    """statistics() returns a frozen snapshot with the documented fields."""
    async with Machine(cpus=2) as m:
        await m.call("fib", 6)
        st = m.statistics()
        assert st.instructions == sum(st.per_cpu_instructions) > 0
        assert (st.grace_periods, st.stray_traps, st.oopses) == (0, 0, 0)
        with pytest.raises(AttributeError):
            st.instructions = 0


async def test_synchronize_waits_for_cpus_in_a_probe():
    """A grace period requested while a CPU is inside a single-step ends only after that CPU
    has run on and passed a quiescent state; one requested while it is quiescent ends at
    once."""
    async with Machine(cpus=2, seed=9, trap_delay=0) as m:
        kp = Kprobe(symbol_name="do_fork", pre_handler=lambda p, r: 0,
                    post_handler=lambda p, r, f: None)
        await m.kprobes.register_kprobe(kp)
        cpu1 = m.cpus[1]
        waited, immediate = [], []

        async def sync_loop():
            while len(waited) < 10:
                await m.call("msleep", 0, cpu=0)        # let CPU 1 run a little
                busy = not m.quiescent(cpu1)
                before = cpu1.quanta
                await m.synchronize()
                (waited if busy else immediate).append(cpu1.quanta - before)
                if busy:
                    assert m.quiescent(cpu1) or cpu1.quanta > before
        async with trio.open_nursery() as n:
            n.start_soon(functools.partial(m.call, "fork_loop", 100_000, cpu=1))
            n.start_soon(sync_loop)
        # Mid-step when asked: the grace period had to wait for CPU 1 to run on.
        assert len(waited) == 10 and min(waited) >= 1
        assert all(d == 0 for d in immediate)


async def test_host_woken_by_a_handler_runs_before_time_leaps():
    """A host task woken by a handler (a trio Event set in a probe) runs before virtual time
    jumps to the next sleeper's wake-up."""
    async with Machine(cpus=1, seed=1) as m:
        ev = trio.Event()
        kp = Kprobe(symbol_name="msleep", pre_handler=lambda p, r: ev.set())
        await m.kprobes.register_kprobe(kp)
        seen = []

        async def waiter():
            await ev.wait()
            seen.append(max(c.clock for c in m.cpus))
        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            n.start_soon(functools.partial(m.call, "sleepy", 1000, cpu=0))
        # The handler ran on the way into msleep(1000): the host must see it then, not
        # after the 1000 ms of virtual sleep.
        assert len(seen) == 1 and seen[0] < 1_000_000_000


@pytest.mark.parametrize("trap_delay", [0, 1 / 16])
async def test_every_breakpoint_trap_is_counted_once(trap_delay):
    """statistics().traps counts each breakpoint trap once, whether the CPU's trap sink is
    the probe core's handler itself (a machine that never defers traps) or that handler
    wrapped in the deferral: a boosted hit is one trap, a stepped hit two.  (Trap-based:
    optimization off.)"""
    async with Machine(cpus=1, seed=1, trap_delay=trap_delay) as m:
        await m.sysctl.write("debug/kprobes-optimization", "0")
        sink = m.cpus[0].trap_sink
        assert (sink == m.kprobes.kprobe_int3_handler) == (trap_delay == 0)
        boosted = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: 0)
        stepped = Kprobe(symbol_name="kprobe_target2", pre_handler=lambda p, r: 0,
                         post_handler=lambda p, r, f: None)
        await m.kprobes.register_kprobes([boosted, stepped])
        for _ in range(5):
            assert await m.call("kprobe_target", 9) == 3
            assert await m.call("kprobe_target2", 9) == 4
        await m.kprobes.unregister_kprobes([boosted, stepped])
        assert (m.statistics().traps, m.kprobes.hits) == (15, 10)


@pytest.mark.parametrize("trap_delay", [0, 1 / 16, 1.0])
async def test_a_breakpoint_no_probe_owns_oopses_its_task(trap_delay):
    """A breakpoint the probe core does not own (poked into the text by hand) kills its task
    with an oops, whether the trap goes straight to the probe core, through the deferral, or
    is handled in the next quantum; the machine goes on.  The invariant checker reports the
    orphan breakpoint."""
    async with Machine(cpus=1, seed=1, trap_delay=trap_delay, invariants="record") as m:
        addr = m.kallsyms_lookup_name("kprobe_target")
        orig = m.read_memory(addr, len(m.backend.breakpoint))
        await m.text_poke(addr, m.backend.breakpoint)
        with pytest.raises(Oops, match=r"breakpoint trap at kprobe_target\+0x0 that no kprobe "
                                       r"owns"):
            await m.call("kprobe_target", 9)
        await m.text_poke(addr, orig)
        assert await m.call("kprobe_target", 9) == 3
        assert m.statistics().traps == 1
    assert m.invariants.violations == ["orphans: a breakpoint at kprobe_target+0x0 that no "
                                       "registered probe owns"]


# -- accounting: what statistics() and the clocks say is what ran ---------------------------
@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
async def test_instructions_and_time_are_what_ran(arch):
    """statistics().instructions, the per-CPU counts and the CPU's virtual clock are the
    instructions the call ran (counted one by one on a bare instance), up to the part of
    the last block the task's end cut off; nothing is charged for the idle rest of a
    quantum."""
    exact = _insns_per_call(arch, "bench_loop", 3000)
    async with Machine(arch=arch, cpus=2, seed=5) as m:
        await m.call("bench_loop", 3000, cpu=1)
        s = m.statistics()
        assert 0 <= s.instructions - exact < 64, (s.instructions, exact)
        assert s.per_cpu_instructions == (0, s.instructions)
        assert m.cpus[1].clock == s.instructions     # no trap: one ns per instruction
        assert m.cpus[0].clock == 0


async def test_calls_from_handlers_are_counted():
    """Instructions a handler's nested call (regs.cpu.call) runs count as instructions of
    that CPU, in statistics() and its clock."""
    nested = _insns_per_call("x86_64", "kprobe_target", 9)

    async def run(call_from_handler):
        def pre(p, regs):
            if call_from_handler:
                regs.cpu.call("kprobe_target", 9)
            return 0
        async with Machine(cpus=1, seed=2, trap_delay=0) as m:
            await m.kprobes.register_kprobe(Kprobe(symbol_name="do_fork", pre_handler=pre))
            await m.call("fork_loop", 10)
            return m.statistics().instructions, m.cpus[0].clock
    (plain, plain_clock), (calling, calling_clock) = await run(False), await run(True)
    # The ten nested calls, each up to a block more (its return stub's), and the outer
    # quanta cut short by them re-counting at most a block's tail each.
    assert 10 * nested <= calling - plain < 10 * (nested + 64), (calling - plain, nested)
    assert calling_clock - plain_clock >= 10 * nested


def test_the_probe_core_keeps_its_attributes_inline():
    """CPython keeps an instance's attributes in an inline array, and specializes the hit
    path's reads of them and of its methods, only while it has at most 30: the probe core,
    read on every trap, stays under that (with 31, the trap handler alone ran about 9%
    longer)."""
    from smpkprobes.kprobes._core import KprobesSubsystem
    m = Machine(cpus=2)
    assert len(vars(m.kprobes)) <= KprobesSubsystem.MAX_INSTANCE_ATTRIBUTES == 30

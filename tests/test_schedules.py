"""Schedules: recording, exact replay, the PCT policy, shrinking, and Hypothesis-driven choices."""

import functools
import random

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smpkprobes import Kprobe, Kretprobe, Machine
from smpkprobes.tools import _stress
from smpkprobes.machine._conductor import (Conductor, PCTConductor, Recording, ReplayConductor,
                                   format_recording, format_schedule, make_conductor,
                                   parse_recording, parse_schedule, policy_factory,
                                   replay_factory)


async def _run(conductor="random", seed=3, preempt=True, cpus=4):
    """A small probed workload; returns (digest, schedule, results, recording text)."""
    async with Machine(cpus=cpus, seed=seed, preempt=preempt, conductor=conductor) as m:
        kp = Kprobe(symbol_name="do_fork", pre_handler=lambda p, r: 0,
                    post_handler=lambda p, r, f: None)
        rp = Kretprobe(symbol_name="fib", handler=lambda ri, r: 0, maxactive=3)
        await m.kprobes.register_kprobe(kp)
        await m.kprobes.register_kretprobe(rp)
        results = {}

        async def one(func, arg, cpu):
            results[(func, cpu)] = await m.call(func, arg, cpu=cpu)
        async with trio.open_nursery() as n:
            for c in range(cpus):
                n.start_soon(one, "fork_loop", 100, c)
                n.start_soon(one, "fib", 11, c)
        await m.kprobes.unregister_kprobe(kp)
        await m.kprobes.unregister_kretprobe(rp)
    return m.trace_digest(), list(m.schedule), results, m.conductor.recording()


@pytest.mark.parametrize("policy", ["random", "pct", "pct:5:50"])
async def test_record_then_replay_gives_the_same_trace_digest(policy):
    """Replaying a run's recording (choices and coins) with the same seed reproduces it
    event for event."""
    digest, schedule, results, text = await _run(policy)
    again = await _run(replay_factory(parse_recording(text), policy))
    assert again == (digest, schedule, results, text)
    assert len(schedule) > 20 and "#" in text


async def test_coins_are_the_machines_other_random_decisions():
    """Trap deferrals, IPI delays and preemptions are recorded as coins, tossed from the
    machine's generator exactly as before (so default runs did not change)."""
    async with Machine(cpus=4, seed=3, preempt=True) as m:
        kp = Kprobe(symbol_name="do_fork", pre_handler=lambda p, r: 0)
        await m.kprobes.register_kprobe(kp)
        async with trio.open_nursery() as n:
            for c in range(4):
                n.start_soon(functools.partial(m.call, "fork_loop", 400, cpu=c))
            await m.call("fork_loop", 10)
            await m.kprobes.unregister_kprobe(kp)
        st = m.statistics()
    kinds = {k for k, _, _ in m.conductor.coins}
    assert kinds == {"defer", "ipi", "preempt"}
    assert sum(v for k, v, _ in m.conductor.coins if k == "defer") == st.deferred_traps
    assert sum(v for k, v, _ in m.conductor.coins if k == "preempt") == st.preemptions


async def test_every_decision_is_recorded_in_order():
    """m.schedule holds one (cpu, quantum) per quantum run, matching the trace's quanta."""
    async with Machine(cpus=2, seed=1) as m:
        async with trio.open_nursery() as n:
            n.start_soon(functools.partial(m.call, "fork_loop", 300, cpu=0))
            n.start_soon(functools.partial(m.call, "fork_loop", 300, cpu=1))
        quanta = [(e[1], e[3]) for e in m.trace if e[0] == "q"]
    assert m.schedule == quanta and m.statistics().quanta == len(quanta)


async def test_a_replayed_prefix_is_followed_then_round_robin():
    """A truncated recording (its first 10 choices, with the coins tossed in them) is
    followed to its end, then CPUs take turns with a fixed quantum and every coin is 0;
    two such replays are identical."""
    _, schedule, results, text = await _run("random")
    prefix = schedule[:10]
    coins = {k: v for k, v in parse_recording(text).coins.items() if k[0] < 10}
    a = await _run(replay_factory(prefix, coins=coins))
    b = await _run(replay_factory(prefix, coins=coins))
    assert a == b and a[1][:10] == prefix and a[2] == results
    assert {q for _, q in a[1][10:]} == {1024}
    # Coins not given are 0 (no deferral, no delay): only the prefix's are in the replay.
    assert parse_recording(a[3]).coins == {k: v for k, v in coins.items() if v}


async def test_pct_differs_from_random_and_is_seeded():
    """PCT makes a different interleaving from the random policy; same seed, same PCT run."""
    r, p1, p2 = await _run("random"), await _run("pct"), await _run("pct")
    r, p1, p2 = r[:3], p1[:3], p2[:3]
    assert p1 == p2 and p1[0] != r[0] and p1[2] == r[2]


def test_pct_priorities_and_change_points():
    """The highest-priority runnable CPU runs; at a change point it drops below the rest."""
    class C:
        def __init__(self, i):
            self.id, self.clock = i, 0
    cpus = [C(i) for i in range(3)]
    pct = PCTConductor(random.Random(7), depth=2, steps=4)
    step = next(iter(pct.change_points))
    picks = [pct.pick(cpus)[0].id for _ in range(6)]
    first = picks[0]
    assert picks[:step] == [first] * step
    assert first not in picks[step:] and len(set(picks[step:])) == 1
    assert pct.schedule[0][0] == first


def test_pct_lets_a_laggard_run():
    """A CPU more than max_lag behind the chosen one runs instead (no starvation for ever)."""
    class C:
        def __init__(self, i, clock):
            self.id, self.clock = i, clock
    pct = PCTConductor(random.Random(1), depth=1, max_lag=100)
    cpus = [C(0, 0), C(1, 0)]
    top = pct.pick(cpus)[0]
    top.clock = 1000
    assert pct.pick(cpus)[0] is not top


def test_replay_falls_back_when_the_recorded_cpu_cannot_run():
    """A recorded CPU that is not runnable yields to the policy's choice, keeping the quantum."""
    class C:
        def __init__(self, i):
            self.id, self.clock = i, 0
    r = ReplayConductor([(5, 99)], Conductor(random.Random(0)))
    cpu, q = r.pick([C(0), C(1)])
    assert (cpu.id, q, r.divergences) == (0, 99, 1)


def test_schedule_text_round_trips():
    """The text forms round-trip: dense choices, sparse choices, coins; empty is empty."""
    s = [(0, 16), (3, 4096), (1, 77)]
    assert parse_schedule(format_schedule(s)) == s and format_schedule(s) == "0:16,3:4096,1:77"
    assert parse_schedule("") == []
    rec = Recording({3: (1, 16), 40: (0, 4096)}, {(7, 0): 1, (7, 1): 2})
    assert format_recording(rec) == "3@1:16,40@0:4096,#7.0=1,#7.1=2"
    assert parse_recording(format_recording(rec)) == rec
    with pytest.raises(ValueError, match="either all"):
        parse_recording("0:16,3@1:16")


def test_conductor_specs():
    """Machine(conductor=...) takes a policy name, a factory or a Conductor."""
    rng = random.Random(0)
    assert type(make_conductor(None, rng, (16, 64))) is Conductor
    assert isinstance(make_conductor("pct:4:100", rng, (16, 64)), PCTConductor)
    assert make_conductor("pct:4:100", rng, (16, 64)).describe() == "pct:4:100"
    c = Conductor(rng)
    assert make_conductor(c, rng, (16, 64)) is c
    assert isinstance(make_conductor(replay_factory([(0, 1)]), rng, (16, 64)), ReplayConductor)
    with pytest.raises(ValueError, match="unknown schedule policy"):
        policy_factory("fifo")


# -- Hypothesis drives the choices ---------------------------------------------------------
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3000)), max_size=60),
       st.dictionaries(st.tuples(st.integers(0, 60), st.integers(0, 8)), st.integers(0, 2),
                       max_size=30))
def test_any_schedule_keeps_the_probe_core_correct(choices, coins):
    """Whatever interleaving and coins (deferred traps, IPI delays) Hypothesis picks,
    results are exact and no invariant breaks (the machine raises InvariantViolation on
    exit if one did)."""
    async def main():
        async with Machine(cpus=4, conductor=replay_factory(choices, coins=coins)) as m:
            hits = [0]
            kp = Kprobe(symbol_name="do_fork",
                        pre_handler=lambda p, r: hits.__setitem__(0, hits[0] + 1))
            rp = Kretprobe(symbol_name="sleepy", handler=lambda ri, r: 0, maxactive=2)
            await m.kprobes.register_kprobe(kp)
            await m.kprobes.register_kretprobe(rp)
            out = []

            async def one(func, arg, cpu):
                out.append((func, await m.call(func, arg, cpu=cpu)))
            async with trio.open_nursery() as n:
                for c in range(4):
                    n.start_soon(one, "fork_loop", 25, c)
                    n.start_soon(one, "sleepy", 1, None)
                await trio.sleep(0)
                await m.kprobes.unregister_kprobe(kp)
                await m.kprobes.unregister_kretprobe(rp)
            assert sorted(out) == sorted([("fork_loop", 25)] * 4 + [("sleepy", 1)] * 4)
            assert hits[0] + kp.nmissed <= 100 and not m.oopses
    trio.run(main)


# -- shrinking ---------------------------------------------------------------------------
NEEDS_A_DEFERRED_TRAP = '''"""needs_a_deferred_trap: fails once a trap is deferred."""
import functools
import trio
from smpkprobes import Kprobe


async def scenario(m, report, args):
    kp = Kprobe(symbol_name="do_fork", pre_handler=lambda p, r: 0)
    await m.kprobes.register_kprobe(kp)
    async with trio.open_nursery() as n:
        for c in range(m.ncpus):
            n.start_soon(functools.partial(m.call, "fork_loop", 50, cpu=c))
    await m.kprobes.unregister_kprobe(kp)
    deferred = m.statistics().deferred_traps
    report.expect(deferred == 0, f"no trap deferred ({deferred} were)")
'''


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """A scenarios/ directory holding one scenario that a single coin makes fail."""
    (tmp_path / "needs_a_deferred_trap.py").write_text(NEEDS_A_DEFERRED_TRAP)
    monkeypatch.setattr(_stress, "SCENARIOS", tmp_path)
    monkeypatch.setattr(_stress, "_loaded", {})
    return "needs_a_deferred_trap"


def test_shrinking_finds_the_one_coin_that_matters(synthetic):
    """A run with many choices and coins shrinks to one deferred trap on top of round-robin;
    replaying that fails the same way, and the empty recording passes."""
    out = _stress.run_once(synthetic, ["--seed", "1"])
    assert not out.ok and len(out.schedule) > 20
    shrunk = _stress.shrink(synthetic, [], 1, out.schedule, out.coins, out.kind)
    assert shrunk.reproduced and shrunk.recording.choices == {}
    assert list(shrunk.recording.coins.values()) == [1]
    assert shrunk.failure == "no trap deferred (1 were)"
    again = _stress.run_once(synthetic, ["--seed", "1", "--replay",
                                         format_recording(shrunk.recording)])
    assert again.failures == ["no trap deferred (1 were)"]
    assert _stress.run_once(synthetic, ["--seed", "1", "--replay", ""]).ok


def test_failure_kinds_ignore_numbers():
    """Two failures that differ only in CPU numbers and addresses are the same kind."""
    a = _stress.failure_kind("invariant slots: cpu2 executes at 0x6000d8 in slot 0x6000c0")
    b = _stress.failure_kind("invariant slots: cpu0 executes at 0x600008 in slot 0x600000")
    assert a == b != _stress.failure_kind("invariant pool: free 1 + in use 2 != maxactive 4")



class _SlowReplays:
    """A replay engine for a failure that needs one override (step `needle`) and replays
    that take `seconds` each, on a clock of its own (`now`, given to the shrinker)."""

    workers = 1

    def __init__(self, needle, seconds):
        self.needle, self.seconds, self.clock = needle, seconds, 0.0

    def now(self):
        return self.clock

    def replays(self, name, argvs, timeout):
        out = []
        for argv in argvs:
            self.clock += self.seconds
            rec = parse_recording(argv[argv.index("--replay") + 1])
            out.append(["needle found"] if self.needle in rec.choices else [])
        return out


def test_shrinking_slow_replays_is_bounded_by_replays_not_a_fixed_time(monkeypatch):
    """Replays of 4 s each: the search goes on for its `max_runs` replays (a fixed 90 s
    ended it after 23, all spent finding the prefix) and finds the one override."""
    from smpkprobes.tools import _shrink
    schedule = [(i % 4, 16 + i % 200) for i in range(5000)]
    engine = _SlowReplays(needle=4990, seconds=4.0)
    monkeypatch.setattr(_shrink.time, "perf_counter", engine.now)
    shrunk = _stress.shrink("concurrent_hits", [], 1, schedule, [],
                            _stress.failure_kind("needle found"), max_runs=60, engine=engine)
    assert shrunk.reproduced and shrunk.recording.choices == {4990: schedule[4990]}
    assert shrunk.runs <= 60 and engine.clock == 4.0 * shrunk.runs


@pytest.mark.parametrize("codes, symbolic, make", [
    ("HQ", None, lambda i: (i % 7, i * 1000 + 3)),
    ("BqQ", 0, lambda i: (("defer", "preempt", "ipi")[i * 7 % 3], -(i % 5), i // 3)),
])
def test_the_recording_logs_unrolled_appends_store_what_the_generic_one_does(codes, symbolic,
                                                                             make):
    """The conductor's two log shapes append through unrolled closures (a coin is logged on
    every trap): row for row they hold what the generic append stores, and read back as
    the tuples appended."""
    from smpkprobes.machine._conductor import _Log
    fast, generic = _Log(codes, symbolic), _Log(codes, symbolic)
    assert "append" in vars(fast)                   # the unrolled one is in use
    items = [make(i) for i in range(500)]
    for item in items:
        fast.append(item)
        _Log.append(generic, item)
    assert list(fast) == list(generic) == items
    assert fast[-1] == items[-1] and len(fast) == 500

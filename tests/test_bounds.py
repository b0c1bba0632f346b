"""Hangs and livelocks are failures: a run's wall-clock and memory bounds (tools/_bounds)."""

import argparse

import trio

from smpkprobes import Kprobe
from smpkprobes.scenario import run
from smpkprobes.tools import _mutants, _stress
from smpkprobes.tools._bounds import BOUND_KIND


def _args(**kw):
    base = dict(arch="x86_64", cpus=2, seed=1, preempt=False, schedule="random", replay=None,
                quanta="mixed", mutant=None, wall_bound=None, memory_bound=None)
    return argparse.Namespace(**{**base, **kw})


async def _livelock(m, report, args):
    """Every CPU fires do_fork for ever while the host unregisters (under the mutant, the
    grace period never ends): busy CPUs, a host that never returns."""
    kp = Kprobe(symbol_name="do_fork", pre_handler=lambda p, r: 0)
    await m.kprobes.register_kprobe(kp)

    async def fire(cpu):
        await m.call("fork_loop", 10**9, cpu=cpu)      # busy for ever
    async with trio.open_nursery() as n:
        for c in range(m.ncpus):
            n.start_soon(fire, c)
        await m.kprobes.unregister_kprobe(kp)
        n.cancel_scope.cancel()


async def test_a_livelocking_mutant_ends_as_a_wall_bound_failure():
    """CPUs busy for ever behind a grace period that never ends: the run ends at its wall
    bound, reported as a failure of its own kind, and the machine shuts down cleanly."""
    report, m = await run(_livelock, _args(mutant="grace_period_never_ends", wall_bound=3),
                          call_budget=10**12,
                          **_mutants.machine_options("grace_period_never_ends"))
    assert not report.ok
    assert report.failures[-1] in (
        f"{BOUND_KIND}: still running after 3 s of wall time (a hang or a livelock?)",
        f"{BOUND_KIND}: no progress within 3 s of wall time (a hang, or a livelock that "
        f"starves the CPUs)")
    assert m.machine.panicked == report.failures[-1]


async def test_a_blocked_run_ends_as_a_hang_failure():
    """A grace period that never ends while every CPU is idle: no quantum runs, and trio's
    deadline ends it as a hang."""
    async def blocked(m, report, args):
        kp = Kprobe(symbol_name="do_fork")
        await m.kprobes.register_kprobe(kp)
        await m.kprobes.unregister_kprobe(kp)

    report, _ = await run(blocked, _args(wall_bound=2),
                          **_mutants.machine_options("grace_period_never_ends"))
    assert report.failures == [f"{BOUND_KIND}: no progress within 2 s of wall time (a hang, "
                               f"or a livelock that starves the CPUs)"]


async def test_a_run_that_grows_past_its_memory_bound_fails():
    """A run that keeps allocating (here the scenario itself, 4 MB per guest call) ends at
    its memory bound, reported as such, long before its wall bound."""
    async def grows(m, report, args):
        hog = []
        while True:
            await m.call("fork_loop", 2000)
            hog.append(bytearray(4 << 20))

    report, m = await run(grows, _args(memory_bound=64, wall_bound=120))
    assert report.failures[-1] == (f"{BOUND_KIND}: the run grew by more than 64 MB of memory "
                                   f"(a livelock filling the trace?)")
    assert m.machine.panicked == report.failures[-1]


async def test_bounds_leave_a_run_within_them_unchanged():
    """Within its bounds a run is the same run: same digest, same verdict."""
    async def work(m, report, args):
        await m.call("fork_loop", 300)
    plain, m1 = await run(work, _args())
    bounded, m2 = await run(work, _args(wall_bound=600, memory_bound=4096))
    assert plain.ok and bounded.ok
    assert m1.trace_digest() == m2.trace_digest()


def test_stress_reports_a_livelocked_seed_with_its_replay_command():
    """A stress seed that livelocks is a failed seed with the bound's kind, not a hang."""
    out = _stress.run_once("unregister_while_firing",
                           _stress.seed_argv(["--mutant", "grace_period_never_ends",
                                              "--size", "5"], 0), timeout=4)
    assert not out.ok and out.failures[-1].startswith(BOUND_KIND)
    assert out.kind == _stress.failure_kind(out.failures[0])


def test_a_test_that_hangs_fails_named_instead_of_stalling_the_suite(tmp_path):
    """The suite's own bound (pytest-timeout, `timeout` in pyproject.toml): a test left
    waiting for ever - here on a grace period that never ends, under the mutant - fails
    with a Timeout that names it, and the run goes on to the next test."""
    import subprocess
    import sys
    (tmp_path / "test_hang.py").write_text(
        "import trio\n"
        "from smpkprobes import Kprobe, Machine\n"
        "from smpkprobes.tools import _mutants\n"
        "async def test_waits_for_ever():\n"
        "    opts = _mutants.machine_options('grace_period_never_ends')\n"
        "    async with Machine(cpus=2, seed=1, **opts) as m:\n"
        "        kp = Kprobe(symbol_name='do_fork', pre_handler=lambda p, r: 0)\n"
        "        await m.kprobes.register_kprobe(kp)\n"
        "        async with trio.open_nursery() as n:\n"
        "            n.start_soon(m.call, 'fork_loop', 10**9)\n"
        "            await m.kprobes.unregister_kprobe(kp)\n"
        "def test_after():\n"
        "    pass\n")
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=5",
         "-c", str(root / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "1 failed, 1 passed" in out.stdout, out.stdout[-3000:]
    assert "Timeout" in out.stdout and "test_waits_for_ever" in out.stdout

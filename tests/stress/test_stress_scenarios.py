"""Stress: every scenario over `--stress-seeds N` seeds (default 3), under the drawn stress mix
(each seed its own quanta, preemption and policy) and under PCT with preemption.  Every run
has a wall-clock and a memory bound, so a livelock fails instead of hanging.  Deep runs:
`pytest tests/stress --stress-seeds 500 -n 8`."""

import pytest

from smpkprobes.tools import _stress
from smpkprobes import scenario as harness

SCENARIOS = ["concurrent_hits", "singlestep_state", "maxactive_contention",
             "unregister_while_firing", "reentrancy", "module_gone", "fault_injection",
             "kprobe_example", "jprobe_example", "kretprobe_example",
             "aggregate_churn", "long_context_unregister", "unit_shapes",
             "data_breakpoint", "watchpoint_race", "optprobe_race"]
BOUNDS = ["--wall-bound", "120", "--memory-bound", "3072"]
CONFIGS = {"drawn": [*BOUNDS], "pct+preempt": ["--schedule", "pct", "--preempt", *BOUNDS]}
FIRST_SEED = 1000          # away from the seeds the scenario tests use


async def stress(name: str, extra: list[str], seeds) -> dict[int, list[str]]:
    """Run `name` once per seed in this trio run; the failures by seed."""
    sc = _stress.load(name)
    failed = {}
    for seed in seeds:
        args = _stress.parse_args(name, _stress.seed_argv(extra, seed))
        report, _ = await harness.run(sc.scenario, args)
        if not report.ok:
            failed[seed] = report.failures[:2] + [
                _stress.replay_command(name, _stress.seed_argv(extra, seed))]
    return failed


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", SCENARIOS)
async def test_scenario_holds_on_every_seed(name, config, stress_seeds):
    """Every expectation of the scenario holds on each seed (replay commands on failure)."""
    seeds = range(FIRST_SEED, FIRST_SEED + stress_seeds)
    assert await stress(name, CONFIGS[config], seeds) == {}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--cpus", "8", "--schedule", "pct:5", "--preempt", *BOUNDS],
                                   ["--cpus", "2", *BOUNDS],
                                   ["--cpus", "1", "--preempt", *BOUNDS]],
                         ids=["8cpus-pct5-preempt", "2cpus", "1cpu-preempt"])
async def test_unregister_while_firing_deep(extra, request, stress_seeds):
    """The batch/one-by-one scenario on unusual machines (only with --stress-seeds)."""
    if not request.config.getoption("--stress-seeds"):
        pytest.skip("a deep run: give --stress-seeds N")
    seeds = range(FIRST_SEED, FIRST_SEED + stress_seeds)
    assert await stress("unregister_while_firing", extra, seeds) == {}

"""The scenarios and the smpkprobes command: run, list, stress (replay commands, shrinking)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from smpkprobes.tools import _cli
from smpkprobes.tools import _stress

ROOT = Path(__file__).resolve().parent.parent
ISSUE_SCENARIOS = ["concurrent_hits", "singlestep_state", "maxactive_contention",
                   "unregister_while_firing", "reentrancy", "module_gone", "fault_injection",
                   "optprobe_race"]
SAMPLES = ["kprobe_example", "jprobe_example", "kretprobe_example"]

# Lines each report must contain: what the kprobes document claims, as the report says it.
CLAIMS = {
    "concurrent_hits": [r"total 1200 hits, nmissed 0, 1200 entries",
                        r"handlers concurrently in flight: up to [2-4] CPUs"],
    "singlestep_state": [r"copied, boosted ", r"copied, stepped ", r"pc-relative fixup",
                         r"simulated call", r"simulated ret",
                         r"reentry: kprobe_target hit 0 times inside a handler, nmissed 24"],
    "maxactive_contention": [r"no\s+4\s+\d+\s+\d+\s+0\s+0\s+0\s+4$",
                             r"yes\s+4\s+.*\s+10$",
                             r"sleepy\(1\) x 3 per CPU nmissed [1-9]"],
    "unregister_while_firing": [r"batch\s+14\s+1\s", r"one-by-one\s+14\s+14\s",
                                r"batch: one grace period for 14 probes"],
    "reentrancy": [r"kprobe_recursed_target \(self\)\s+160\s+320"],
    "module_gone": [r"example_mod_func\+0x0  \[example_mod\] \[GONE\]",
                    r"enable_kprobe on the gone probe: .*EINVAL"],
    "fault_injection": [r"Don't drink and probe", r"a direct call returned -12"],
    "optprobe_race": [r"sentinel hits \d+ \+ missed 0", r"optimizer: [1-9]\d* jump batches"],
}


def test_list_names_every_scenario_with_its_summary(capsys):
    """`smpkprobes list` shows each scenario and the first line of its docstring."""
    assert _cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ISSUE_SCENARIOS + SAMPLES:
        assert re.search(rf"^{name}\s+\S", out, re.M), name
    assert "load a module, probe it, unload it" in out


@pytest.mark.parametrize("name", ISSUE_SCENARIOS)
def test_scenario_passes_and_reports_the_documents_claims(name):
    """Each scenario's expectations hold at its default size, and its report says so."""
    out = _stress.run_once(name, ["--seed", "0"])
    assert out.ok, out.failures
    text = "\n".join(out.lines)
    for claim in CLAIMS[name]:
        assert re.search(claim, text, re.M), (claim, text)


@pytest.mark.parametrize("name", SAMPLES)
def test_samples_run_on_the_harness(name):
    """The three Linux samples run in-process on the harness too (so they can be stressed)."""
    assert _stress.run_once(name, ["--seed", "1", "--cpus", "2"]).ok


def test_a_scenario_runs_as_a_script_and_through_the_command(capsys):
    """`python scenarios/X.py` and `smpkprobes run X` print the same verdict."""
    proc = subprocess.run([sys.executable, str(ROOT / "scenarios" / "fault_injection.py"),
                           "--seed", "5", "--cpus", "2"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _cli.main(["run", "fault_injection", "--seed", "5", "--cpus", "2"]) == 0
    out = capsys.readouterr().out
    assert proc.stdout.splitlines()[-1] == out.splitlines()[-1]
    assert out.splitlines()[-1].startswith("PASS: ")


def test_stress_passes_and_summarises(capsys):
    """`smpkprobes stress` over passing seeds exits 0 with a one-line summary."""
    assert _cli.main(["stress", "reentrancy", "--seeds", "0:3", "--no-progress",
                      "--size", "5"]) == 0
    out = capsys.readouterr().out
    assert "stress reentrancy: 3 seeds (0:3), 3 passed, 0 failed" in out


def test_stress_with_a_mutant_prints_replay_commands_that_reproduce(capsys):
    """A failing stress run exits 1, prints a replay command per failing seed and a shrunk
    reproducer; both replay to the same failure."""
    status = _cli.main(["stress", "concurrent_hits", "--seeds", "3:5", "--no-progress",
                        "--mutant", "no_text_sync", "--size", "40", "--shrink-runs", "12"])
    out = capsys.readouterr().out
    assert status == 1
    assert "2 seeds (3:5), 0 passed, 2 failed" in out
    commands = [line.strip() for line in out.splitlines()
                if line.strip().startswith("smpkprobes run concurrent_hits")]
    assert commands[:2] == [
        "smpkprobes run concurrent_hits " + " ".join(_stress.draw_policy(s)) +
        f" --mutant no_text_sync --size 40 --seed {s}" for s in (3, 4)]
    assert "minimal reproducer" in out and "--replay" in commands[-1]
    first_failure = re.search(r"shrinking the schedule of seed 3 \(\d+ choices, \d+ "
                              r"non-zero coins\): (.*)", out).group(1)
    for cmd in (commands[0], commands[-1]):
        argv = shlex.split(cmd)[1:]
        assert _cli.main(argv) == 1
        replayed = capsys.readouterr().out
        assert _stress.failure_kind(first_failure) in {
            _stress.failure_kind(line.removeprefix("EXPECTATION FAILED: "))
            for line in replayed.splitlines() if line.startswith("EXPECTATION FAILED")}


def test_parallel_jobs_give_the_same_runs():
    """--jobs runs seeds in separate processes with the very same outcomes and digests."""
    seq = _stress.run_seeds("fault_injection", ["--size", "9"], range(3), progress=False)
    par = _stress.run_seeds("fault_injection", ["--size", "9"], range(3), jobs=2,
                            progress=False)
    assert [(o.seed, o.ok, o.digest) for o in seq] == [(o.seed, o.ok, o.digest) for o in par]


def test_stress_refuses_an_unknown_scenario(capsys):
    """An unknown scenario name is an error with a hint, exit status 2."""
    assert _cli.main(["stress", "no_such_scenario", "--seeds", "0:1", "--no-progress"]) == 2
    assert "see `smpkprobes list`" in capsys.readouterr().err


def test_stress_draws_each_seeds_schedule_unless_the_command_line_pins_it():
    """A seed's quanta, preemption and policy come from the seed; a flag given pins that part
    for every seed, and the draw over many seeds covers every choice."""
    drawn = [tuple(_stress.draw_policy(s)) for s in range(64)]
    assert drawn == [tuple(_stress.draw_policy(s)) for s in range(64)]       # replayable
    assert {d[1] for d in drawn} == {"fine", "mixed", "coarse"}
    assert {d[2] for d in drawn} == {"--preempt", "--no-preempt"}
    assert {d[4] for d in drawn} == {"random", "pct"}
    assert _stress.draw_policy(5, ["--quanta", "fine", "--preempt", "--schedule", "pct:2"]) == []
    assert _stress.draw_policy(5, ["--no-preempt"])[:2] == list(drawn[5][:2])
    assert "--no-preempt" not in _stress.draw_policy(5, ["--no-preempt"])
    assert _stress.seed_argv(["--size", "3"], 7) == [*drawn[7], "--size", "3", "--seed", "7"]

"""The command line's front door: bad input is one line and exit 2, before anything runs."""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smpkprobes.tools import _stress
from smpkprobes.tools._cli import main

ERROR = re.compile(r"^smpkprobes: error: .+ \(.+\)$")


def one_line_error(capsys, argv) -> str:
    """Run `main(argv)`; check exit 2, nothing on stdout, one error line; return it."""
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 2, (argv, out, err)
    assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert ERROR.match(lines[0]), lines[0]
    return lines[0]


BAD_INPUT = {
    # stress
    "seeds reversed": (["stress", "kprobe_example", "--seeds", "5:2"], "--seeds '5:2' is empty"),
    "seeds not numbers": (["stress", "kprobe_example", "--seeds", "abc"],
                          "--seeds 'abc' is not A:B"),
    "no jobs": (["stress", "kprobe_example", "--jobs", "0"], "--jobs: 0 is not >= 1"),
    "stress unknown scenario": (["stress", "no_such", "--seeds", "0:1"], "no scenario 'no_such'"),
    "stress bad scenario flag": (["stress", "kprobe_example", "--cpus", "x"],
                                 "--cpus: 'x' is not a whole number"),
    "stress bad policy": (["stress", "kprobe_example", "--schedule", "bogus"],
                          "unknown schedule policy 'bogus'"),
    "stress out is a file": (["stress", "kprobe_example", "--out", __file__],
                             f"--out {__file__}: is a file"),
    # recordings
    "replay missing file": (["run", "kprobe_example", "--replay", "@nonexistent.txt"],
                            "cannot read recording 'nonexistent.txt'"),
    "replay garbage": (["run", "kprobe_example", "--replay", "garbage"],
                       "'garbage' is not a recording item"),
    "replay step without quantum": (["run", "kprobe_example", "--replay", "1@2"],
                                    "'1@2' is not a recording item"),
    "replay bad coin": (["run", "kprobe_example", "--replay", "#x=1"],
                        "'#x=1' is not a recording item"),
    "replay mixed forms": (["run", "kprobe_example", "--replay", "0:5,3@1:7"],
                           "either all CPU:QUANTUM or all STEP@CPU:QUANTUM"),
    "replay CPU out of range": (["run", "kprobe_example", "--replay", "9@9:100"],
                                "names CPU 9 of a 4-CPU machine"),
    "replay negative CPU": (["run", "kprobe_example", "--replay=-1:100"],
                            "names CPU -1 of a 4-CPU machine"),
    "replay negative quantum": (["run", "kprobe_example", "--replay", "0:-5"],
                                "has a quantum of -5"),
    "replay zero quantum": (["run", "kprobe_example", "--replay", "0:0"], "has a quantum of 0"),
    "replay negative coin": (["run", "kprobe_example", "--replay", "#3.0=-1"],
                             "coin #3.0=-1 is negative"),
    # run
    "run bad policy": (["run", "kprobe_example", "--schedule", "bogus"],
                       "unknown schedule policy 'bogus'"),
    "run unknown scenario": (["run", "no_such"], "no scenario 'no_such'"),
    "run unknown flag": (["run", "kprobe_example", "--bogus"], "unrecognized arguments: --bogus"),
    "run bad mutant": (["run", "kprobe_example", "--mutant", "nope"], "invalid choice: 'nope'"),
    "run no CPUs": (["run", "kprobe_example", "--cpus", "0"], "--cpus: 0 is not >= 1"),
    "run negative CPUs": (["run", "kprobe_example", "--cpus", "-1"], "--cpus: -1 is not >= 1"),
    "run unknown arch": (["run", "kprobe_example", "--arch", "vax"], "unknown architecture 'vax'"),
    "trace into a missing directory": (["run", "kprobe_example", "--trace", "no/such/dir/t.txt"],
                                       "--trace no/such/dir/t.txt: directory 'no/such/dir' "
                                       "does not exist"),
    "perfetto into a missing directory": (["run", "kprobe_example", "--perfetto", "nodir/p.json"],
                                          "directory 'nodir' does not exist"),
    "plot into a missing directory": (["run", "kprobe_example", "--plot", "nodir/t.png"],
                                      "directory 'nodir' does not exist"),
    "record into a missing directory": (["run", "kprobe_example", "--record", "nodir/r.txt"],
                                        "directory 'nodir' does not exist"),
    "trace into a directory": (["run", "kprobe_example", "--trace", str(Path(__file__).parent)],
                               f"--trace {Path(__file__).parent}: is a directory"),
    # demo
    "demo no CPUs": (["demo", "--cpus", "0"], "--cpus: 0 is not >= 1"),
    "demo negative CPUs": (["demo", "--cpus", "-1"], "--cpus: -1 is not >= 1"),
    "demo unsupported arch": (["demo", "--arch", "ia64"], "architecture 'ia64' is not supported"),
    "demo unknown arch": (["demo", "--arch", "vax"], "available: x86_64"),
    "demo stray argument": (["demo", "extra"], "unrecognized arguments: extra"),
    # trace
    "trace no CPUs": (["trace", "p:x do_fork", "--cpus", "0"], "--cpus: 0 is not >= 1"),
    "trace negative CPUs": (["trace", "p:x do_fork", "--cpus", "-1"], "--cpus: -1 is not >= 1"),
    "trace bad definition": (["trace", "p:bad do_sys_open fd=%ax:u12", "--cpus", "1"],
                             "bad kprobe_events definition in 'p:bad do_sys_open fd=%ax:u12': "
                             "EINVAL: Unknown type is specified"),
    "trace unknown symbol": (["trace", "p:bad nosuch", "--cpus", "1"],
                             "ENOENT: Invalid probed address or symbol"),
    "trace unknown workload": (["trace", "p:x do_fork", "--workload", "nosuch"],
                               "no guest function nosuch"),
    "trace bad workload argument": (["trace", "p:x do_fork", "--workload", "fib:x"],
                                    "arguments must be integers"),
    "trace perfetto into a missing directory": (["trace", "p:x do_fork", "--perfetto",
                                                 "nodir/p.json"], "directory 'nodir'"),
    "trace unknown arch": (["trace", "p:x do_fork", "--arch", "ia64"], "'ia64' is not supported"),
    # selftest, bench, the command itself
    "selftest unknown mutant": (["selftest", "--only", "nope"], "invalid choice: 'nope'"),
    "selftest no seeds": (["selftest", "--max-seeds", "0"], "--max-seeds: 0 is not >= 1"),
    "bench unknown arch": (["bench", "overhead", "--arch", "vax"], "unknown architecture"),
    "bench unknown part": (["bench", "everything"], "invalid choice: 'everything'"),
    "unknown command": (["bogus"], "invalid choice: 'bogus'"),
    "no command": ([], "the following arguments are required: COMMAND"),
}


@pytest.mark.parametrize("argv, what", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_line_and_exit_2(capsys, argv, what):
    """Each bad argument, file or recording: `smpkprobes: error: WHAT (WHAT TO DO)`, exit 2,
    and nothing run."""
    assert what in one_line_error(capsys, argv)


def test_unsupported_arch_is_a_clear_error(capsys):
    """`smpkprobes demo --arch ia64` exits 2 with the reason on stderr."""
    line = one_line_error(capsys, ["demo", "--arch", "ia64"])
    assert line.startswith("smpkprobes: error: architecture 'ia64' is not supported")


def test_a_recording_replayed_on_another_machine_is_refused(tmp_path, capsys):
    """A --record file names its arch and CPU count; replaying it with other --cpus or --arch
    is refused before the run, and with the same ones it replays the same run."""
    rec = tmp_path / "r.txt"
    assert main(["run", "kprobe_example", "--cpus", "2", "--size", "1", "--record",
                 str(rec), "--quiet"]) == 0
    recorded = capsys.readouterr().out.splitlines()[-1]
    assert rec.read_text().startswith("# smpkprobes recording: arch=x86_64 cpus=2 seed=0 ")
    line = one_line_error(capsys, ["run", "kprobe_example", "--cpus", "3", "--size", "1",
                                   "--replay", f"@{rec}"])
    assert "was recorded with --arch x86_64 --cpus 2, not --arch x86_64 --cpus 3" in line
    assert "(replay it with --arch x86_64 --cpus 2)" in line
    line = one_line_error(capsys, ["run", "kprobe_example", "--cpus", "2", "--arch", "i386",
                                   "--replay", f"@{rec}"])
    assert "not --arch i386 --cpus 2" in line
    assert main(["run", "kprobe_example", "--cpus", "2", "--size", "1", "--replay", f"@{rec}",
                 "--quiet"]) == 0
    replayed = capsys.readouterr().out.splitlines()[-1]
    assert recorded.split("trace ")[1] == replayed.split("trace ")[1]


def test_version_is_the_installed_distributions(capsys):
    """`smpkprobes --version` prints the version the package was installed with."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"smpkprobes {importlib.metadata.version('smpkprobes')}\n"


def test_run_name_help_shows_the_scenarios_own_flags(capsys):
    """`run NAME --help` lists the common flags and the ones that scenario adds."""
    assert main(["run", "jprobe_example", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: smpkprobes run jprobe_example ")
    for flag in ("--cpus", "--replay", "--perfetto", "--python-entry"):
        assert flag in out, flag
    assert "samples/kprobes/jprobe_example.c" in out


def test_run_help_says_where_the_scenario_flags_are(capsys):
    """`run --help` points at `run NAME --help`."""
    assert main(["run", "--help"]) == 0
    assert "`smpkprobes run NAME --help`" in " ".join(capsys.readouterr().out.split())


def test_a_closed_pipe_is_not_a_traceback():
    """`smpkprobes list | head -1` prints one line and nothing on stderr."""
    proc = subprocess.run(["bash", "-c", f"'{sys.executable}' -m smpkprobes list | head -1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.stderr == ""
    assert proc.stdout.startswith(_stress.scenario_names()[0] + " ")


def test_stress_writes_long_reproducers_under_the_out_directory(tmp_path, monkeypatch, capsys):
    """A reproducer too long for a command line goes to --out DIR (created on demand), with
    the machine's shape in its header; the printed command replays it from there."""
    out_dir = tmp_path / "repro"
    monkeypatch.setattr(_stress, "INLINE_CHOICES", 0)
    monkeypatch.setattr(_stress, "shrink", lambda *a, **k: _stress.Shrunk(
        _stress._conductor.parse_recording("0:1024,1:1024"), 9, 1, True, "the failure"))
    status = main(["stress", "concurrent_hits", "--seeds", "3:4", "--no-progress",
                   "--mutant", "no_text_sync", "--size", "40", "--cpus", "2",
                   "--out", str(out_dir)])
    out = capsys.readouterr().out
    assert status == 1
    path = out_dir / "replay-concurrent_hits-seed3.txt"
    assert path.read_text() == ("# smpkprobes recording: arch=x86_64 cpus=2 seed=3 "
                                "schedule=random\n0:1024,1:1024\n")
    assert f"(the recording is long: written to {path})" in out
    assert f"--replay @{path}" in out
    assert list(Path.cwd().glob("smpkprobes-replay-*")) == []


def test_stress_defaults_to_the_dot_smpkprobes_directory():
    """Without --out, reproducers go under .smpkprobes/ (which git ignores)."""
    assert _stress.DEFAULT_OUT == ".smpkprobes"
    ignored = (Path(__file__).parent.parent / ".gitignore").read_text().split()
    assert ".smpkprobes/" in ignored


def test_the_demo_labels_what_it_prints_and_ends_with_a_verdict(capsys):
    """Every block of the demo has a label line, and the last line is the verdict."""
    assert main(["demo", "--cpus", "2"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0].startswith("smpkprobes demo: x86_64, 2 CPUs, seed 1: a kprobe on do_fork")
    blocks = [b.splitlines()[0] for b in out.split("\n\n")]
    assert [b.split(" (")[0].split(":")[0] for b in blocks[1:]] == [
        "debugfs kprobes/list", "per CPU", "machine", "guest calls", "printk log",
        "trace digest"]
    assert lines[-1] == ("verdict: PASS: do_fork probe hit 400 times (expected 400 = 200 calls "
                         "x 2 CPUs), nmissed 0, 0 oops(es)")

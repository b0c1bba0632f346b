"""The installed product: the wheel built from this tree, installed into a fresh venv and
used from another directory, and the source tree's scripts used without any install.

No network: the wheel is built with the setuptools of the test environment (no build
isolation), and the fresh venvs get the dependencies (trio, unicorn...) through a .pth line
pointing at the test environment's site-packages, not from an index.  smpkprobes itself
comes only from the wheel (or, for the source-tree test, from the checkout).
"""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.packaging

# What a fresh clone holds that the build reads; caches and local outputs are left behind.
IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__",
                                ".smpkprobes", ".pytest_cache", ".hypothesis", "out*")


def _run(argv, cwd, timeout=120):
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _deps_only_venv(where: Path) -> Path:
    """A fresh venv with no pip and no smpkprobes, that sees the test environment's
    dependencies.  Returns its python."""
    _run([sys.executable, "-m", "venv", "--without-pip", where], cwd=where.parent)
    python = where / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=where.parent).stdout.strip()
    Path(purelib, "_smpkprobes_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """smpkprobes-*.whl built from a copy of this tree; the build must print no warning."""
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "--no-index", "-w", tmp / "dist", src], cwd=tmp)
    noise = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "warn" in ln.lower()]
    assert noise == [], "\n".join(noise)
    (whl,) = (tmp / "dist").glob("smpkprobes-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (`pip install --no-deps`); its bin/."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    python = _deps_only_venv(venv)
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          wheel], cwd=venv.parent)
    return venv / "bin"


def test_the_wheel_claims_only_the_smpkprobes_name_and_ships_everything(wheel):
    """One top-level import name; the scenarios, arch facts and kernel images are inside."""
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"smpkprobes"}
    scenarios = {p.name for p in (ROOT / "scenarios").glob("*.py")}
    assert {n.rsplit("/", 1)[1] for n in names
            if n.startswith("smpkprobes/scenarios/")} == scenarios
    assert "smpkprobes/cpus/x86_64.py" in names
    for arch_dir in (ROOT / "smpkprobes/machine/kernel/images").iterdir():
        for f in arch_dir.iterdir():
            assert f"smpkprobes/machine/kernel/images/{arch_dir.name}/{f.name}" in names


def test_the_installed_command_works_from_another_directory(installed, tmp_path):
    """`smpkprobes list`, `run`, `stress`, `trace` and `demo` from a fresh venv, run in an
    empty directory, use the installed package and its scenarios."""
    cmd = installed / "smpkprobes"
    where = _run([installed / "python", "-c", "import smpkprobes; print(smpkprobes.__file__)"],
                 cwd=tmp_path).stdout
    assert where.startswith(str(installed.parent)), where
    listed = _run([cmd, "list"], cwd=tmp_path).stdout.splitlines()
    assert [ln.split()[0] for ln in listed] == sorted(
        p.stem for p in (ROOT / "scenarios").glob("*.py") if not p.stem.startswith("_"))
    run = _run([cmd, "run", "kprobe_example", "--cpus", "2", "--size", "2"], cwd=tmp_path)
    assert run.stdout.splitlines()[-1].startswith("PASS: 7/7 expectations held")
    assert run.stderr == ""
    stress = _run([cmd, "stress", "kprobe_example", "--seeds", "0:2", "--no-progress",
                   "--cpus", "2", "--size", "1"], cwd=tmp_path)
    assert "2 seeds (0:2), 2 passed, 0 failed" in stress.stdout
    trace = _run([cmd, "trace", "p:myfork do_fork", "--cpus", "2", "--loops", "1"],
                 cwd=tmp_path)
    assert trace.stdout.count("myfork: (do_fork+0x0)") == 2
    demo = _run([cmd, "demo", "--cpus", "2"], cwd=tmp_path)
    assert demo.stdout.splitlines()[-1].startswith("verdict: PASS")
    assert demo.stderr == ""
    # nothing written where it was run (but the campaign store the test suite points
    # SMPKPROBES_STORE at, which conftest puts in this same tmp_path)
    assert [p for p in tmp_path.iterdir() if not p.name.startswith("campaigns.sqlite")] == []


def test_a_scenario_script_runs_from_a_checkout_that_is_not_installed(tmp_path):
    """`python scenarios/X.py` with only the dependencies installed finds smpkprobes, its
    arch facts and its harness in the checkout."""
    python = _deps_only_venv(tmp_path / "v")
    proc = _run([python, ROOT / "scenarios" / "kprobe_example.py", "--cpus", "2", "--size", "1"],
                cwd=tmp_path)
    assert proc.stdout.splitlines()[-1].startswith("PASS: ")


def test_make_kernels_without_clang_is_one_line(tmp_path):
    """`make kernels` on a machine without clang says what it needs in one line."""
    make = shutil.which("make")
    proc = subprocess.run([make, "-s", "-C", ROOT, "kernels"], capture_output=True, text=True,
                          env={"PATH": str(tmp_path)}, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert "make kernels needs clang and ld.lld on the PATH" in proc.stderr

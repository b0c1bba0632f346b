"""The README's examples run, and print what the README shows (a doctest of its blocks).

- A ```python block runs as a script; when the README follows it with "prints" and a ```text
  block, the output must be exactly that.
- A ```console block is `$ COMMAND` lines, each followed by the output it shows; the command
  runs through `main()` and its stdout, then stderr, must match.  `...` alone on a line
  stands for any lines, and inside a line for any text.
- In a ```sh block, `smpkprobes ...` and `python scenarios/...` lines run (exit 0); the
  make targets and venv set-up lines are what `.ci/run` itself does, and are skipped.
"""

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from smpkprobes.tools._cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```\n(?:\s*prints\s*\n+```text\n(.*?)^```)?", re.S | re.M)


def blocks(lang: str) -> list[tuple[str, str | None]]:
    return [(body, shown) for kind, body, shown in BLOCK.findall(README) if kind == lang]


def commands(body: str) -> list[tuple[str, list[str]]]:
    """`$ command` lines (with `\\` continuations) and the output lines shown after each."""
    out: list[tuple[str, list[str]]] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.startswith("$ "):
            out[-1][1].append(line)
            continue
        cmd = line[2:]
        while cmd.endswith("\\"):
            cmd = cmd[:-1] + " " + lines[i].strip()
            i += 1
        out.append((cmd, []))
    return out


def pattern(shown: list[str]) -> re.Pattern:
    parts = ["(?:.*\n)*?" if ln.strip() == "..." else
             re.escape(ln).replace(re.escape("..."), ".*") + "\n" for ln in shown]
    return re.compile("".join(parts))


PYTHON = blocks("python")
CONSOLE = [c for body, _ in blocks("console") for c in commands(body)]
SHELL = [ln.split("#")[0].strip() for body, _ in blocks("sh") for ln in body.splitlines()
         if ln.startswith(("smpkprobes ", ".venv/bin/smpkprobes ", "python "))]


def test_the_readme_has_the_examples_this_file_runs():
    """The API tour, the replay example, the console sessions and the command lines."""
    assert len(PYTHON) >= 2 and all(shown for _, shown in PYTHON)
    assert "Kprobe(symbol_name=\"do_fork\"" in PYTHON[0][0]
    assert len(CONSOLE) >= 5 and len(SHELL) >= 3


@pytest.mark.parametrize("code, shown", PYTHON, ids=[f"python{i}" for i in range(len(PYTHON))])
def test_python_example(code, shown, tmp_path, monkeypatch):
    """The block runs and prints exactly what the README shows after it."""
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    assert out.getvalue() == shown


@pytest.mark.parametrize("cmd, shown", CONSOLE, ids=[c[:60] for c, _ in CONSOLE])
def test_console_example(cmd, shown, tmp_path, monkeypatch, capsys):
    """The command runs (exit 0 or 1, never 2) and prints what the README shows."""
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(cmd)
    assert argv[0] == "smpkprobes"
    assert main(argv[1:]) in (0, 1)
    out, err = capsys.readouterr()
    assert pattern(shown).fullmatch(out + err), f"{cmd}\n--- got:\n{out}{err}"


@pytest.mark.parametrize("line", SHELL)
def test_shell_example(line, tmp_path, monkeypatch, capsys):
    """Each command line of the README's shell blocks runs and exits 0."""
    argv = shlex.split(line)
    if argv[0] == "python":
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:]) == 0

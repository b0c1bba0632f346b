"""How the command line says no.

Every bad argument, file or recording is one line on stderr and exit status 2:

    smpkprobes: error: <what is wrong> (<what to do>)

A `UsageError` carries the two halves.  The parsers here raise it instead of printing
argparse's usage block, and the checks below run before anything is simulated, so a typo
never costs a whole run (and never ends in a traceback after one).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PREFIX = "smpkprobes: error: "


class UsageError(ValueError):
    """A bad argument, file or recording: `what` is wrong, `todo` says how to fix it."""

    def __init__(self, what: str, todo: str | None = None):
        super().__init__(what)
        self.what = what
        self.todo = todo

    def __str__(self) -> str:
        return f"{self.what} ({self.todo})" if self.todo else self.what


def arch_error(err: ValueError) -> UsageError:
    """An `UnsupportedArchError`, with the arches that do run as what to do."""
    from smpkprobes.cpus import available
    return UsageError(str(err), f"--arch takes {', '.join(available())}")


def report(err: BaseException, file=None) -> int:
    """Print `err` in the one error style; return the exit status 2."""
    print(PREFIX + " ".join(str(err).split("\n")[0].split()), file=file or sys.stderr)
    return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a parse error is a `UsageError` (one line) instead of usage + exit, and
    no abbreviated flags: `stress --schedule` is the scenario's flag, not `--scheduler`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        where = self.prog.removeprefix("smpkprobes").strip()
        raise UsageError(f"{where}: {message}" if where else message,
                         f"see `{self.prog} --help`")


# == argument types ======================================================================
def positive_int(text: str) -> int:
    """An integer >= 1 (`--cpus`, `--jobs`, `--max-seeds`)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not > 0")
    return value


# == files ===============================================================================
def check_output(path: str | None, flag: str) -> None:
    """Refuse, before the run, an output file that cannot be written where it is asked for."""
    if not path:
        return
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a directory", "give a file name")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {str(parent)!r} does not exist",
                         "create it first, or write somewhere else")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: directory {str(parent)!r} is not writable",
                         "write somewhere else")


def check_output_dir(path: str, flag: str) -> None:
    """A directory that will be created when something is written into it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a directory", "give a directory")
    existing = next((q for q in (p, *p.parents) if q.exists()), Path("."))
    if not os.access(existing, os.W_OK):
        raise UsageError(f"{flag} {path}: {str(existing)!r} is not writable",
                         "give a directory you can write to")


def read_input(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as err:
        raise UsageError(f"cannot read {what} {path!r}: {err.strerror or err}",
                         "give an existing, readable file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path!r} is not a text file",
                         "give a recording written by --record or stress") from None

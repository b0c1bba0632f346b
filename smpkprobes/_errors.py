"""Errors smpkprobes raises.  Each carries an errno or a readable oops report."""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass, field


class KprobeError(OSError):
    """A kprobes API call failed.  `.errno` is as in spec/KPROBES.md; after a failed batch
    registration `.index` is the position of the probe that failed."""

    def __init__(self, errno: int, message: str, index: int | None = None):
        super().__init__(errno, f"{_errno.errorcode.get(errno, errno)}: {message}")
        self.index = index


class UnknownSymbolError(KeyError, ValueError):
    """No guest symbol of that name.  A KeyError (a failed lookup) and a ValueError (bad
    input), so that either spelling catches it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class OopsRecord:
    """One task killed by an unhandled fault, handler exception or runaway."""

    pid: int
    comm: str
    cpu: int
    ip: int
    symbol: str
    cause: str
    registers: tuple[tuple[str, int], ...] = ()
    call_trace: tuple[str, ...] = ()
    report: str = field(default="", compare=False)

    def __str__(self) -> str:
        return self.report or self.cause


class Oops(Exception):
    """Raised by `Machine.call` when the guest task was killed; `.record` says why."""

    def __init__(self, record: OopsRecord):
        super().__init__(record.report or record.cause)
        self.record = record


class RunawayError(Oops):
    """The task used up its instruction budget: most likely a guest infinite loop."""


class SimulationError(Exception):
    """A condition the kernel would report loudly ("kretprobe BUG!", "Unrecoverable kprobe
    detected").  It is recorded on the machine and printed in printk_log; the host is not
    crashed."""


class MachinePanic(SimulationError):
    """The machine was stopped by `panic()` (a run bound exceeded: a hang or a livelock).
    Host code waiting on it (a grace period, a text sync) gets this instead of waiting on."""

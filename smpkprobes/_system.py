"""`Machine`: the SMP machine with the probe core attached (the public entry point)."""

from __future__ import annotations

from .kprobes._debugfs import Debugfs
from .kprobes._optprobe import Sysctl
from .tools._invariants import Invariants
from .kprobes._core import KprobesSubsystem
from .machine._machine import SMPMachine
from .kprobes._tracefs import Tracefs


class Machine(SMPMachine):
    """`Machine(arch="x86_64", cpus=4, seed=0, preempt=False, kernel=None, **options)`.

    An async context manager: inside `async with`, every CPU runs as a trio task.  `m.kprobes`
    is the kprobes subsystem and `m.debugfs` its debugfs view.

    `m.invariants` checks the probe core's invariants during the whole run (see
    `_invariants`).  `invariants="raise"` (the default) raises `InvariantViolation` when the
    `async with` block ends if one was broken; "record" only records them in
    `m.invariants.violations`; False turns the checks off.
    """

    def __init__(self, arch: str = "x86_64", cpus: int = 4, seed: int = 0, preempt: bool = False,
                 kernel=None, *, invariants: str | bool = "raise", **options):
        super().__init__(arch, cpus, seed, preempt, kernel, **options)
        self.kprobes = KprobesSubsystem(self)
        self.debugfs = Debugfs(self, self.kprobes)
        self.sysctl = Sysctl(self.kprobes.optimizer)
        self.tracefs = Tracefs(self, self.kprobes)
        self.invariants = Invariants(self, self.kprobes, "raise" if invariants is True
                                     else invariants) if invariants else None

    async def __aexit__(self, *exc):
        suppress = await super().__aexit__(*exc)
        if self.invariants is not None:
            self.invariants.finish(raise_=exc[0] is None)
        return suppress

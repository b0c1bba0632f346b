"""`Machine`: the SMP machine with the probe core attached (the public entry point)."""

from __future__ import annotations

from ._debugfs import Debugfs
from ._kprobes import KprobesSubsystem
from ._machine import SMPMachine


class Machine(SMPMachine):
    """`Machine(arch="x86_64", cpus=4, seed=0, preempt=False, kernel=None, **options)`.

    An async context manager: inside `async with`, every CPU runs as a trio task.  `m.kprobes`
    is the kprobes subsystem and `m.debugfs` its debugfs view.
    """

    def __init__(self, arch: str = "x86_64", cpus: int = 4, seed: int = 0, preempt: bool = False,
                 kernel=None, **options):
        super().__init__(arch, cpus, seed, preempt, kernel, **options)
        self.kprobes = KprobesSubsystem(self)
        self.debugfs = Debugfs(self, self.kprobes)

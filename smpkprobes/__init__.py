"""smpkprobes: Linux kprobes, re-implemented in Python, on a simulated SMP machine.

The layout, bottom up (dependencies point one way, probe core -> machine -> cpus):

  cpus/                  per-architecture facts: breakpoints, calling conventions, stepping
  smpkprobes/_memory     the one physical memory every CPU shares
  smpkprobes/_cpu        a Unicorn instance as one CPU
  smpkprobes/_machine    CPUs as trio tasks, the seeded conductor, guest tasks, text_poke,
                         grace periods, oopses
  smpkprobes/_kprobes*   the probe core: registry, hit path, slots, kretprobes, jprobes
  smpkprobes/_debugfs    the kprobes/ files
  smpkprobes/_system     `Machine`: the machine with the probe core attached

The public names are re-exported here explicitly; tests/test_public_api.py pins them.
"""

from ._errors import KprobeError as KprobeError
from ._errors import Oops as Oops
from ._errors import OopsRecord as OopsRecord
from ._errors import RunawayError as RunawayError
from ._errors import SimulationError as SimulationError
from ._machine import MachineStatistics as MachineStatistics
from ._system import Machine as Machine
from ._kprobes import Kprobe as Kprobe
from ._kprobes import Jprobe as Jprobe
from ._kprobes import Kretprobe as Kretprobe
from ._kprobes import jprobe_return as jprobe_return
from ._kprobes import regs_return_value as regs_return_value

__version__ = "0.1.0"

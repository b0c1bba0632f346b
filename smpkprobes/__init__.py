"""smpkprobes: Linux kprobes, re-implemented in Python, on a simulated SMP machine.

The layout, bottom up (dependencies point one way: tools -> probe core -> machine -> cpus):

  smpkprobes/cpus        (cpus/ in the source tree) per-architecture facts, as data
  smpkprobes/machine/    the simulated SMP machine: memory, CPUs, conductor and run queue,
                         tasks, text patching, grace periods, modules, hypercalls, oopses,
                         kernel images.  It knows nothing of kprobes; kernel code beside it
                         uses `KernelServices` (machine/_services.py) and its typed events.
  smpkprobes/kprobes/    the probe core: probe objects, registry, hit path, slots,
                         kretprobes, jprobes, debugfs, tracefs (kprobes/_core.py maps them)
  smpkprobes/tools/      the command line, scenario harness, stress, mutants, invariants,
                         bench, trace export
  smpkprobes/_system     `Machine`: the machine, the probe core and the invariant checker,
                         composed
  smpkprobes/scenarios   (scenarios/ in the source tree) the scenario scripts

The public names are re-exported here explicitly; tests/test_public_api.py pins them.
"""

from ._errors import KprobeError as KprobeError
from ._errors import Oops as Oops
from ._errors import OopsRecord as OopsRecord
from ._errors import RunawayError as RunawayError
from ._errors import SimulationError as SimulationError
from .machine._machine import MachineStatistics as MachineStatistics
from ._system import Machine as Machine
from .kprobes._core import Kprobe as Kprobe
from .kprobes._core import Jprobe as Jprobe
from .kprobes._core import Kretprobe as Kretprobe
from .kprobes._core import jprobe_return as jprobe_return
from .kprobes._core import regs_return_value as regs_return_value

__version__ = "0.1.0"

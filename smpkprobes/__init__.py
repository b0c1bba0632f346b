"""smpkprobes: Linux kprobes, re-implemented in Python, on a simulated SMP machine.

The layout, bottom up (dependencies point one way: tools -> probe core -> machine -> cpus):

  smpkprobes/cpus        (cpus/ in the source tree) per-architecture facts, as data
  smpkprobes/machine/    the simulated SMP machine: memory, CPUs, conductor and run queue,
                         tasks, text patching, grace periods, modules, hypercalls, oopses,
                         kernel images.  It knows nothing of kprobes; kernel code beside it
                         uses `KernelServices` (machine/_services.py) and its typed events.
  smpkprobes/kprobes/    the probe core: probe objects, registry, hit path, slots,
                         kretprobes, jprobes, debugfs, tracefs (kprobes/_core.py maps them)
  smpkprobes/hw_breakpoint/  hardware breakpoints (watchpoints) beside the probe core: per-CPU
                         debug registers, the slot constraint table, wide and per-task ones
  smpkprobes/tools/      the command line, scenario harness, stress, mutants, invariants,
                         bench, trace export
  smpkprobes/_system     `Machine`: the machine, the probe core and the invariant checker,
                         composed
  smpkprobes/scenarios   (scenarios/ in the source tree) the scenario scripts

The public names are re-exported here explicitly; tests/test_public_api.py pins them.
"""

import importlib.util as _util
import os as _os

# Installed (a wheel, or `pip install -e .`), cpus/ and scenarios/ are the subpackages
# smpkprobes.cpus and smpkprobes.scenarios, as pyproject.toml maps them.  Imported straight
# from a source checkout that is not installed (`python scenarios/X.py` with only the
# dependencies installed), they sit beside this package, not inside it: then the checkout's
# root joins the package's search path, which is where the import system looks for them.
if _util.find_spec(__name__ + ".cpus") is None:
    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if _os.path.isfile(_os.path.join(_root, "cpus", "__init__.py")):
        __path__.append(_root)

from ._errors import KprobeError as KprobeError
from ._errors import Oops as Oops
from ._errors import OopsRecord as OopsRecord
from ._errors import RunawayError as RunawayError
from ._errors import SimulationError as SimulationError
from .machine._machine import MachineStatistics as MachineStatistics
from .machine._conductor import replay_factory as replay_factory
from ._system import Machine as Machine
from .kprobes._core import Kprobe as Kprobe
from .kprobes._core import Jprobe as Jprobe
from .kprobes._core import Kretprobe as Kretprobe
from .kprobes._core import jprobe_return as jprobe_return
from .kprobes._core import regs_return_value as regs_return_value
from .hw_breakpoint._core import HwBreakpointAttr as HwBreakpointAttr

__version__ = "0.1.0"

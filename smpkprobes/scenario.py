"""The scenario harness, as scenario scripts import it: `from smpkprobes.scenario import ...`.

The implementation lives in the tooling layer (`smpkprobes/tools/_harness.py`); this module
is the public name scripts in scenarios/ are written against.
"""

from .tools._harness import Report as Report
from .tools._harness import machine_options as machine_options
from .tools._harness import on_every_cpu as on_every_cpu
from .tools._harness import parser as parser
from .tools._harness import run as run
from .tools._harness import scenario_main as scenario_main

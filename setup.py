# Everything else is in pyproject.toml.  This file only declares the optional C extensions: the
# block budget's callback (smpkprobes/machine/_blockbudget.py), the trace digest's fold
# (smpkprobes/machine/_tracefold.py) and the code hooks' dispatch
# (smpkprobes/machine/_codehook.py).  `optional=True` turns a failed build (no C compiler,
# no Python headers) into a warning, and the package then runs the Python twin.
from setuptools import Extension, setup

setup(ext_modules=[Extension("smpkprobes.machine._blockbudget_native",
                             ["smpkprobes/machine/_blockbudget_native.c"], optional=True),
                   # The trace digest's fold (smpkprobes/machine/_tracefold.py), likewise.
                   Extension("smpkprobes.machine._tracefold_native",
                             ["smpkprobes/machine/_tracefold_native.c"], optional=True),
                   # The optimized hit's code hooks (smpkprobes/machine/_codehook.py), likewise.
                   Extension("smpkprobes.machine._codehook_native",
                             ["smpkprobes/machine/_codehook_native.c"], optional=True)])

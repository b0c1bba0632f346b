# Everything else is in pyproject.toml.  This file only declares the block budget's optional C
# callback (smpkprobes/machine/_blockbudget.py): `optional=True` turns a failed build (no C
# compiler, no Python headers) into a warning, and the package then runs its Python twin.
from setuptools import Extension, setup

setup(ext_modules=[Extension("smpkprobes.machine._blockbudget_native",
                             ["smpkprobes/machine/_blockbudget_native.c"], optional=True)])

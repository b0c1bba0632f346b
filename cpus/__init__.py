"""Per-architecture CPU backends.

Each backend module declares one `CpuBackend` (mostly data) and registers it here.  The
machine looks a backend up once, by name, in `get_backend`; nothing else in smpkprobes
branches on the architecture.
"""

from __future__ import annotations

import importlib

from ._base import (CallingConvention as CallingConvention, CpuBackend as CpuBackend,
                    InsnPlan as InsnPlan, Register as Register, StepKind as StepKind,
                    UnsteppableError as UnsteppableError)
from ._unicorn import UnicornQuirks as UnicornQuirks
from ._hwbp import HwBreakpointFacts as HwBreakpointFacts, hw_breakpoint_facts as hw_breakpoint_facts

# name -> (module, reason it is unavailable or None).  Order is the README's table order.
_REGISTRY: dict[str, tuple[str | None, str | None]] = {
    "x86_64": (".x86_64", None),
    "i386": (".i386", None),
    "arm64": (".arm64", None),
    "ppc": (".ppc", None),
    "arm": (".arm", None),
    "ppc64": (None, "Unicorn 2.1.4 boots no usable 64-bit PowerPC CPU: the default PPC64 CPU "
                    "starts with MSR=0x8000000000000000 (SF=1, HV=0) and takes interrupt 70 "
                    "(POWERPC_EXCP_HISI, hypervisor instruction storage) at the very first "
                    "instruction fetch, before anything runs; uc_reg_write(UC_PPC_REG_MSR) cannot "
                    "set MSR[HV] (Unicorn masks it), and ctl_set_cpu_model(UC_CPU_PPC64_*) selects "
                    "a 32-bit CPU instead (UC_CPU_PPC64_POWER9_V2_0 reads PVR 0x401100c5 with "
                    "MSR=0, and the 64-bit rldicl raises illegal-instruction interrupt 96)"),
    "sparc64": (".sparc64", None),
    "ia64": (None, "Unicorn has no IA-64 emulator, so there is nothing to run ia64 code on"),
}


class UnsupportedArchError(ValueError):
    """Raised for an architecture smpkprobes cannot run, with the reason."""


def available() -> list[str]:
    return [name for name, (mod, _) in _REGISTRY.items() if mod is not None]


def get_backend(name: str) -> CpuBackend:
    try:
        module, reason = _REGISTRY[name]
    except KeyError:
        raise UnsupportedArchError(
            f"unknown architecture {name!r}; available: {', '.join(available())}") from None
    if module is None:
        raise UnsupportedArchError(f"architecture {name!r} is not supported: {reason}")
    return importlib.import_module(module, __name__).BACKEND

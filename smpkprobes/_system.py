"""`Machine`: the SMP machine and the probe core, put together (the public entry point).

The parts meet only here.  The machine (`machine.SMPMachine`) knows nothing of kprobes;
the probe core (`kprobes.KprobesSubsystem`) sees the machine only through its
`KernelServices`, and `m.hw_breakpoints` (`hw_breakpoint.HwBreakpointSubsystem`) only
through its `HwBreakpointServices` (both in machine/_services.py); the invariant checker
(`tools._invariants`) subscribes to the events the machine and the probe core publish.
`Machine` holds them all and forwards the machine's public surface (API.md).
"""

from __future__ import annotations

from .kprobes._core import KprobesSubsystem
from .kprobes._debugfs import Debugfs
from .kprobes._optprobe import Sysctl
from .kprobes._tracefs import Tracefs
from .machine._machine import SMPMachine
from .machine._services import HwBreakpointServices, KernelServices
from .tools._invariants import Invariants
from .hw_breakpoint._core import HwBreakpointSubsystem


def _forward(name: str, settable: bool = False, doc: str | None = None) -> property:
    def get(self):
        return getattr(self.machine, name)

    def set_(self, value):
        setattr(self.machine, name, value)
    return property(get, set_ if settable else None,
                    doc=doc or f"The machine's `{name}` (see `machine.SMPMachine`).")


class Machine:
    """`Machine(arch="x86_64", cpus=4, seed=0, preempt=False, kernel=None, **options)`.

    An async context manager: inside `async with`, every CPU runs as a trio task.  `m.kprobes`
    is the kprobes subsystem, `m.debugfs` and `m.tracefs` its file views, `m.machine` the
    simulated machine itself.

    `m.invariants` checks the probe core's invariants during the whole run (see
    `_invariants`).  `invariants="raise"` (the default) raises `InvariantViolation` when the
    `async with` block ends if one was broken; "record" only records them in
    `m.invariants.violations`; False turns the checks off.

    `probe_core` is the class of the probe core, `KprobesSubsystem` unless a tool says
    otherwise: it is the seam through which `tools._mutants` builds a machine whose probe
    core has one known bug; `hw_breakpoint_core` is the same seam for `m.hw_breakpoints`.
    """

    # The machine's public surface, forwarded: read-only facts and state ...
    arch = _forward("arch")
    ncpus = _forward("ncpus")
    seed = _forward("seed")
    # Settable: a scenario about preemption may insist on it (optprobe_race).
    preempt = _forward("preempt", settable=True)
    backend = _forward("backend")
    cpus = _forward("cpus")
    memory = _forward("memory")
    kernel = _forward("kernel")
    kallsyms = _forward("kallsyms")
    kprobes_text = _forward("kprobes_text")
    modules = _forward("modules")
    insn_starts = _forward("insn_starts")
    printk_log = _forward("printk_log")
    oopses = _forward("oopses")
    trace = _forward("trace")
    schedule = _forward("schedule")
    events = _forward("events")
    module_coming_hooks = _forward("module_coming_hooks")
    # ... options that may be changed while it runs ...
    trap_delay = _forward("trap_delay", settable=True)
    text_sync = _forward("text_sync", settable=True)
    conductor = _forward("conductor", settable=True)
    call_budget = _forward("call_budget", settable=True)

    def __init__(self, arch: str = "x86_64", cpus: int = 4, seed: int = 0, preempt: bool = False,
                 kernel=None, *, invariants: str | bool = "raise",
                 probe_core: type[KprobesSubsystem] = KprobesSubsystem,
                 hw_breakpoint_core: type[HwBreakpointSubsystem] = HwBreakpointSubsystem,
                 **options):
        self.machine = SMPMachine(arch, cpus, seed, preempt, kernel, **options)
        services = KernelServices(self.machine)
        self.kprobes = probe_core(services)
        self.debugfs = Debugfs(services, self.kprobes)
        self.sysctl = Sysctl(self.kprobes.optimizer)
        self.tracefs = Tracefs(self, self.kprobes)
        self.hw_breakpoints = hw_breakpoint_core(HwBreakpointServices(self.machine))
        self.debugfs.files["hw_breakpoint/list"] = self.hw_breakpoints.debugfs_list
        self.invariants = Invariants(self.machine, self.kprobes, "raise" if invariants is True
                                     else invariants) if invariants else None
        m = self.machine
        # ... and its methods (bound once: `m.call` is the machine's own).
        self.call = m.call
        self.kallsyms_lookup_name = m.kallsyms_lookup_name
        self.symbolize = m.symbolize
        self.format_addr = m.format_addr
        self.resolve_function = m.resolve_function
        self.read_memory = m.read_memory
        self.write_memory = m.write_memory
        self.statistics = m.statistics
        self.trace_digest = m.trace_digest
        self.trace_event = m.trace_event
        self.now_ns = m.now_ns
        self.sleep_ns = m.sleep_ns
        self.text_poke = m.text_poke
        self.text_poke_batch = m.text_poke_batch
        self.synchronize = m.synchronize
        self.smp_call_function_many = m.smp_call_function_many
        self.spawn = m.spawn
        self.quiescent = m.quiescent
        self.load_module = m.load_module
        self.unload_module = m.unload_module
        self.module_of = m.module_of

    async def __aenter__(self):
        await self.machine.__aenter__()
        return self

    async def __aexit__(self, *exc):
        suppress = await self.machine.__aexit__(*exc)
        if self.invariants is not None:
            self.invariants.finish(raise_=exc[0] is None)
        return suppress

    def export_ftrace(self, out) -> None:
        """Write the event trace as ftrace-style text to `out` (a path or a text file)."""
        from .tools._trace_export import export_ftrace
        export_ftrace(self, out)

    def export_perfetto(self, out) -> None:
        """Write the event trace as Chrome/Perfetto trace-event JSON (one track per CPU)."""
        from .tools._trace_export import export_perfetto
        export_perfetto(self, out)

    def __repr__(self) -> str:
        return f"<Machine {self.arch} cpus={self.ncpus} seed={self.seed}>"

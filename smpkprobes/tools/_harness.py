"""The scenario harness: what every script in scenarios/ is built on.

A scenario is an async function `scenario(m, report, args)` that drives a booted machine and
states its expectations on `report`.  `scenario_main(scenario, __doc__)` gives it the common
command line (`--arch --cpus --seed --preempt` plus the trace exports), prints the report and
exits non-zero when an expectation failed, so the same script serves `python scenarios/X.py`,
`smpkprobes run X` and `smpkprobes stress X`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import importlib.util
import functools
import sys
import traceback
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import trio

from smpkprobes.cpus import UnsupportedArchError

from ..machine import _conductor
from . import _mutants
from . import _trace_export
from ._bounds import Bounds
from ._usage import (ArgumentParser, UsageError, arch_error, check_output, positive_int,
                     read_input, report as report_error)
from .._system import Machine


def scenarios_dir() -> Path:
    """Where the scenario scripts are: `scenarios/` in a source tree, and the same files as
    the `smpkprobes.scenarios` package in an installed wheel."""
    spec = importlib.util.find_spec("smpkprobes.scenarios")
    if spec is None or not spec.submodule_search_locations:
        raise LookupError("the smpkprobes.scenarios package is missing: reinstall smpkprobes")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass
class Report:
    """Lines to print, and expectations that decide the exit status."""

    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    checks: int = 0
    # A `_trace_export.plot_curves` specification (curves, xlabel, ylabel, title) that
    # `--plot` draws instead of the per-CPU timeline, for scenarios whose point is a curve.
    plot: dict | None = None

    def print(self, *parts) -> None:
        self.lines.append(" ".join(str(p) for p in parts))

    def expect(self, ok: bool, what: str) -> bool:
        self.checks += 1
        if not ok:
            self.failures.append(what)
            self.lines.append(f"EXPECTATION FAILED: {what}")
        return ok

    def crash(self, exc: BaseException) -> None:
        """The scenario raised: that is a failed expectation too, with the exception's
        innermost frames (exception groups from nurseries are flattened)."""
        for leaf in _leaves(exc):
            text = str(leaf).strip()
            first = text.splitlines()[0] if text else ""
            if first.startswith("Oops: "):
                first = first[len("Oops: "):]
            self.expect(False, f"scenario raised {type(leaf).__name__}: {first}")
            self.lines.extend(f"    {line}" for line in text.splitlines()[1:])
            tb = traceback.extract_tb(leaf.__traceback__)[-3:]
            self.lines.extend(f"    at {f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}"
                              for f in tb)

    @property
    def ok(self) -> bool:
        return not self.failures


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


Scenario = Callable[[Machine, Report, argparse.Namespace], Awaitable[None]]


async def on_every_cpu(m: Machine, func: str, *args: int) -> dict[int, int]:
    """Call `func(*args)` pinned to each CPU, all at once; {cpu: result}."""
    results: dict[int, int] = {}

    async def one(cpu: int) -> None:
        results[cpu] = await m.call(func, *args, cpu=cpu)
    async with trio.open_nursery() as n:
        for cpu in range(m.ncpus):
            n.start_soon(one, cpu)
    return results


def parser(description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The common scenario flags.  A bad flag raises `UsageError` (one line), not argparse's
    usage block."""
    ap = ArgumentParser(prog=prog, description=description,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="x86_64")
    ap.add_argument("--cpus", type=positive_int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preempt", action=argparse.BooleanOptionalAction, default=False,
                    help="preemptible guest tasks (stress draws it per seed unless given)")
    ap.add_argument("--size", type=int, default=None, help="workload size (scenario-specific)")
    ap.add_argument("--quiet", action="store_true", help="print only the verdict")
    s = ap.add_argument_group("schedules (see smpkprobes stress)")
    s.add_argument("--schedule", default="random", metavar="POLICY",
                   help="conductor policy: random (default), pct, pct:D or pct:D:STEPS")
    s.add_argument("--quanta", default="mixed", choices=sorted(QUANTA),
                   help="quantum lengths: fine (16-300 instructions: short windows), mixed "
                        "(16-4096, the default) or coarse (4096-16384)")
    s.add_argument("--replay", default=None, metavar="CHOICES",
                   help="follow this recording ('cpu:quantum,...,#coin=value' or @FILE); "
                        "round-robin and coins 0 where it says nothing")
    s.add_argument("--record", default=None, metavar="FILE",
                   help="write the run's recording (choices and coins) to FILE")
    s.add_argument("--mutant", default=None, choices=_mutants.names(),
                   help="inject a known probe-core bug (the mutation check of the stress suite)")
    s.add_argument("--wall-bound", type=float, default=None, metavar="SECONDS",
                   help="end the run as a failure after this much host time (a livelock)")
    s.add_argument("--memory-bound", type=float, default=None, metavar="MB",
                   help="end the run as a failure when it grows by this much memory")
    x = ap.add_argument_group("what happened (written after the run)")
    x.add_argument("--trace", default=None, metavar="FILE",
                   help="the event trace as ftrace-style text")
    x.add_argument("--perfetto", default=None, metavar="FILE",
                   help="the event trace as Chrome/Perfetto trace-event JSON (ui.perfetto.dev)")
    x.add_argument("--plot", default=None, metavar="FILE",
                   help="a picture (PNG, SVG...) of the per-CPU timeline; needs matplotlib")
    return ap


# The quantum ranges `--quanta` names (instructions; see `Conductor.quantum` for the draw).
QUANTA = {"fine": (16, 300), "mixed": (16, 4096), "coarse": (4096, 16384)}

# Scenario workloads are small: a runaway guest (a broken probe core) is cut off sooner.
CALL_BUDGET = 2_000_000


def machine_options(args: argparse.Namespace) -> dict:
    """The Machine options the schedule flags ask for (`UsageError` for a bad policy or
    recording)."""
    replay = getattr(args, "replay", None)
    policy = getattr(args, "schedule", "random")
    try:
        _conductor.policy_factory(policy)
    except ValueError:
        raise UsageError(f"unknown schedule policy {policy!r}",
                         "use --schedule random, pct, pct:D or pct:D:STEPS") from None
    conductor = policy
    if replay is not None:          # "" is the empty recording: round-robin, coins 0
        conductor = _conductor.replay_factory(load_recording(replay, args), policy)
    return {"conductor": conductor, "call_budget": CALL_BUDGET,
            "quantum": QUANTA[getattr(args, "quanta", "mixed")]}


# == recordings ============================================================================
# A recording file (--record, and the reproducers stress writes) starts with this line, so
# that replaying it on another machine shape is refused instead of silently diverging.
RECORDING_HEADER = "# smpkprobes recording:"
_ITEM_FORMS = "CPU:QUANTUM, STEP@CPU:QUANTUM or #STEP.K=VALUE items, comma-separated"


def recording_file(args: argparse.Namespace, recording: str) -> str:
    """A recording as a file: the header (arch, CPUs, seed, policy), then the text."""
    return (f"{RECORDING_HEADER} arch={args.arch} cpus={args.cpus} seed={args.seed} "
            f"schedule={getattr(args, 'schedule', 'random')}\n{recording}\n")


def load_recording(spec: str, args: argparse.Namespace) -> _conductor.Recording:
    """`--replay TEXT` or `--replay @FILE`, parsed and checked against the machine `args`
    asks for: CPU ids below --cpus, quanta >= 1, steps and coins >= 0, and for a file with a
    header, the same --arch and --cpus."""
    source = f"--replay {spec!r}"
    text = spec
    if spec.startswith("@"):
        source = f"recording {spec[1:]!r}"
        text = read_input(spec[1:], "recording")
    meta: dict[str, str] = {}
    items: list[str] = []
    for line in text.splitlines():
        if line.startswith(RECORDING_HEADER):
            meta = dict(tok.split("=", 1) for tok in line[len(RECORDING_HEADER):].split()
                        if "=" in tok)
        elif not line.startswith("# "):
            items += [it for it in line.replace(" ", "").split(",") if it]
    for item in items:
        try:
            _conductor.parse_recording(item)
        except ValueError:
            raise UsageError(f"{source}: {item!r} is not a recording item",
                             f"write {_ITEM_FORMS}") from None
    try:
        rec = _conductor.parse_recording(",".join(items))
    except ValueError as err:
        raise UsageError(f"{source}: {err}", f"write {_ITEM_FORMS}") from None
    for key, flag in (("arch", "arch"), ("cpus", "cpus")):
        if key in meta and meta[key] != str(getattr(args, flag)):
            raise UsageError(
                f"{source} was recorded with --arch {meta.get('arch')} --cpus "
                f"{meta.get('cpus')}, not --arch {args.arch} --cpus {args.cpus}",
                f"replay it with --arch {meta.get('arch')} --cpus {meta.get('cpus')}")
    for step, (cpu, quantum) in sorted(rec.choices.items()):
        where = f"{source}: choice {step}@{cpu}:{quantum}"
        if step < 0:
            raise UsageError(f"{where} has a negative step", "steps count from 0")
        if not 0 <= cpu < args.cpus:
            raise UsageError(f"{where} names CPU {cpu} of a {args.cpus}-CPU machine",
                             f"use CPU ids 0..{args.cpus - 1}, or the --cpus it was "
                             f"recorded with")
        if quantum < 1:
            raise UsageError(f"{where} has a quantum of {quantum}",
                             "a quantum is at least 1 instruction")
    for (step, k), value in sorted(rec.coins.items()):
        if step < 0 or k < 0 or value < 0:
            raise UsageError(f"{source}: coin #{step}.{k}={value} is negative",
                             "coins are #STEP.K=VALUE with all three >= 0")
    return rec


def check_args(args: argparse.Namespace) -> None:
    """Everything about `args` that can be checked before the run: the schedule policy, the
    recording to replay, and that every output file can be written.  Raises `UsageError`."""
    machine_options(args)
    for flag in ("trace", "perfetto", "plot", "record"):
        check_output(getattr(args, flag, None), f"--{flag}")
    if getattr(args, "plot", None):
        try:
            _trace_export.require_matplotlib()
        except _trace_export.PlotUnavailable as err:
            raise UsageError(str(err)) from None


async def run(scenario: Scenario, args: argparse.Namespace,
              **machine_options_) -> tuple[Report, Machine]:
    """Boot a machine as `args` says, run the scenario, return its report and the machine."""
    report = Report()
    options = {**machine_options(args), "invariants": "record",
               **_mutants.machine_options(getattr(args, "mutant", None)), **machine_options_}
    m = Machine(arch=args.arch, cpus=args.cpus, seed=args.seed, preempt=args.preempt,
                **options)
    bounds = Bounds(getattr(args, "wall_bound", None), getattr(args, "memory_bound", None))
    try:
        with trio.CancelScope() as scope:
            bounds.install(m.machine, scope)
            async with trio.open_nursery() as guard:
                guard.start_soon(bounds.watchdog)
                try:
                    async with m:
                        try:
                            await scenario(m, report, args)
                        except Exception as exc:    # reported as a failure, not a traceback
                            if not bounds.exceeded:
                                report.crash(exc)
                        report.expect(not m.oopses, f"no oops ({len(m.oopses)} seen)")
                finally:
                    guard.cancel_scope.cancel()
    except Exception as exc:                # the machine itself went down
        if not bounds.exceeded:
            report.crash(exc)
    if bounds.exceeded:
        report.expect(False, bounds.exceeded)
    if m.invariants is not None:
        for v in m.invariants.violations:
            report.expect(False, f"invariant {v}")
    return report, m


def scenario_main(scenario: Scenario, description: str | None = None,
                  argv: list[str] | None = None, configure=None, prog: str | None = None) -> int:
    """Parse the command line, run, print, and exit with 0 (all expectations held) or 1; a
    bad argument, file or recording is one line on stderr and exit status 2."""
    ap = parser(description, prog)
    if configure is not None:
        configure(ap)
    try:
        args = ap.parse_args(argv)
        check_args(args)
        report, m = trio.run(functools.partial(run, scenario, args))
    except UsageError as err:
        return report_error(err)
    except UnsupportedArchError as err:
        return report_error(arch_error(err))
    if not args.quiet:
        for line in report.lines:
            print(line)
    if args.record:
        with open(args.record, "w") as f:
            f.write(recording_file(args, m.conductor.recording()))
    verdict = "PASS" if report.ok else "FAIL"
    print(f"{verdict}: {report.checks - len(report.failures)}/{report.checks} expectations held "
          f"(arch {args.arch}, {args.cpus} CPUs, seed {args.seed}"
          f"{', preempt' if args.preempt else ''}"
          f"{', quanta ' + args.quanta if args.quanta != 'mixed' else ''}"
          f"{', schedule ' + m.conductor.describe() if m.conductor.name != 'random' else ''}"
          f"{', MUTANT ' + args.mutant if args.mutant else ''}; trace {m.trace_digest()})")
    _trace_export.export_all(m, trace=getattr(args, "trace", None),
                             perfetto=getattr(args, "perfetto", None),
                             plot=getattr(args, "plot", None), curves=report.plot,
                             title=ap.prog.rsplit(" ", 1)[-1].removesuffix(".py"),
                             log=functools.partial(print, file=sys.stderr))
    return 0 if report.ok else 1


if __name__ == "__main__":   # pragma: no cover
    sys.exit("run a scenario from scenarios/ instead")

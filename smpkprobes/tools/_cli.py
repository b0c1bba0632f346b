"""The `smpkprobes` command: demo, run, list, stress, selftest, trace, bench.

Each subcommand is a pair registered with `@subcommand`: a function that adds its flags to
its parser, and a function that runs it with the parsed namespace.  Adding a subcommand is
adding one such pair; `main()` owns the error handling for all of them.

Bad input (an unknown flag, a bad number, a missing file, a bad recording or kprobe_events
definition, an unsupported arch) is one line on stderr, `smpkprobes: error: WHAT (WHAT TO
DO)`, and exit status 2, before anything is simulated.
"""

from __future__ import annotations

import argparse
import functools
import os
import runpy
import sys
from dataclasses import dataclass
from typing import Callable

import trio

from ._campaign import CampaignError, StoreError
from ._usage import (ArgumentParser, UsageError, arch_error, check_output, non_negative_int,
                     positive_float, positive_int, report)

@dataclass(frozen=True)
class Command:
    help: str
    description: str | None
    configure: Callable[[argparse.ArgumentParser], None]   # adds the command's flags
    run: Callable[[argparse.Namespace], int]               # the exit status
    passes_unknown: bool = False    # flags it does not know go on, as `args.rest`


COMMANDS: dict[str, Command] = {}


def subcommand(name: str, help: str, configure: Callable, description: str | None = None,
               passes_unknown: bool = False):
    """Register `run(args) -> int` as `smpkprobes NAME`, with `configure(parser)` adding
    its flags."""
    def register(run: Callable) -> Callable:
        COMMANDS[name] = Command(help, description, configure, run, passes_unknown)
        return run
    return register


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    ap = ArgumentParser(prog="smpkprobes", description=__doc__.split("\n\n")[0],
                        epilog="`smpkprobes COMMAND --help` gives a command's flags.")
    ap.add_argument("--version", action="version", version=f"smpkprobes {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                            parser_class=ArgumentParser)
    for name, c in COMMANDS.items():
        c.configure(sub.add_parser(name, help=c.help, description=c.description or c.help))
    return ap


def main(argv: list[str] | None = None) -> int:
    """The command line.  Returns the exit status: 0, 1 when a run found a failure, 2 for
    bad input (one line on stderr, `smpkprobes: error: ...`, nothing simulated)."""
    from smpkprobes.cpus import UnsupportedArchError
    try:
        ap = build_parser()
        args, args.rest = ap.parse_known_args(argv)
        command = COMMANDS[args.cmd]
        if args.rest and not command.passes_unknown:
            ap.error(f"unrecognized arguments: {' '.join(args.rest)}")
        return command.run(args)
    except UsageError as err:
        return report(err)
    except (CampaignError, StoreError) as err:     # their messages say what to do
        print(f"smpkprobes: error: {err}", file=sys.stderr)
        return 2
    except UnsupportedArchError as err:
        return report(arch_error(err))
    except SystemExit as exit_:         # --help and --version, or a scenario script's exit
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except BrokenPipeError:
        # `smpkprobes list | head`: the reader left.  Point stdout at /dev/null so that the
        # interpreter's final flush does not complain, as the Python docs advise.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _machine_flags(p: argparse.ArgumentParser, seed: int = 1) -> None:
    p.add_argument("--arch", default="x86_64", help="guest architecture (default x86_64)")
    p.add_argument("--cpus", type=positive_int, default=4, help="number of CPUs (default 4)")
    p.add_argument("--seed", type=int, default=seed, help=f"the run's seed (default {seed})")
    p.add_argument("--preempt", action="store_true", help="preemptible guest kernel")


def _check_arch(arch: str) -> None:
    from smpkprobes.cpus import get_backend
    get_backend(arch)                   # UnsupportedArchError, with the reason


# == demo ================================================================================
@subcommand("demo", "the main job: a 4-CPU machine with a probe on do_fork, summarised",
            _machine_flags)
def _demo(a) -> int:
    from ._demo import demo
    _check_arch(a.arch)
    return trio.run(functools.partial(demo, a.arch, a.cpus, a.seed, a.preempt))


# == run and list ========================================================================
def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", metavar="NAME", help="a scenario (`smpkprobes list`)")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="...",
                   help="the scenario's own flags: `smpkprobes run NAME --help` lists them")


@subcommand("run", "run a scenario from scenarios/", _run_flags,
            description="Run scenario NAME once.  Every scenario takes --arch --cpus --seed "
                        "--preempt --size, the schedule flags (--schedule, --replay, "
                        "--record, --mutant) and the exports (--trace, --perfetto, --plot); "
                        "some add their own.  `smpkprobes run NAME --help` shows that "
                        "scenario's flags.")
def _run(a) -> int:
    from . import _harness, _stress
    sc = _stress.load(a.scenario)
    if sc.scenario is None:             # a standalone script: run it as its own main
        sys.argv = [str(sc.path), *a.args]
        runpy.run_path(str(sc.path), run_name="__main__")
        return 0
    return _harness.scenario_main(sc.scenario, sc.doc, a.args, sc.configure,
                                  prog=f"smpkprobes run {a.scenario}")


@subcommand("list", "list the scenarios", lambda p: None)
def _list(a) -> int:
    from . import _stress
    for name in _stress.scenario_names():
        print(f"{name:<26} {_stress.describe(name)}")
    return 0


# == stress and selftest =================================================================
def _stress_flags(s: argparse.ArgumentParser) -> None:
    from ._stress import DEFAULT_OUT
    s.add_argument("scenario", metavar="NAME")
    s.add_argument("--seeds", default="0:100", metavar="A:B", help="seeds A..B-1 (default 0:100)")
    s.add_argument("--jobs", type=positive_int, default=1, help="parallel processes (default 1)")
    s.add_argument("--timeout", type=positive_float, default=120.0,
                   help="wall-clock seconds before a run counts as hung (default 120)")
    s.add_argument("--no-shrink", action="store_true", help="do not shrink failing schedules")
    s.add_argument("--shrink-runs", type=non_negative_int, default=120,
                   help="most replays spent shrinking one failure (default 120)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"where reproducer recordings are written (default {DEFAULT_OUT}/)")
    from . import _campaign
    _campaign.add_engine_options(s)


@subcommand("stress", "run a scenario over many seeds; replay and shrink failures",
            _stress_flags, passes_unknown=True,
            description="Run NAME once per seed in A:B (flags this command does not know go "
                        "to the scenario, e.g. --cpus 8 --preempt --schedule pct --mutant "
                        "NAME).  Prints a replay command for every failing seed and a shrunk "
                        "schedule per kind of failure; recordings too long for a command line "
                        "are written under --out DIR.")
def _stress_cmd(a) -> int:
    from . import _campaign, _stress
    seeds = _stress.parse_seeds(a.seeds)
    return _stress.stress_main(a.scenario, seeds, a.rest, jobs=a.jobs, timeout=a.timeout,
                               do_shrink=not a.no_shrink, shrink_runs=a.shrink_runs,
                               progress=not a.no_progress, out_dir=a.out,
                               **_campaign.engine_options(a))


def _selftest_flags(st: argparse.ArgumentParser) -> None:
    from . import _mutants
    st.add_argument("--mutants", action="store_true",
                    help="inject each known probe-core bug; show which seed catches it")
    st.add_argument("--only", nargs="+", metavar="MUTANT", choices=_mutants.names(),
                    help="just these mutants")
    st.add_argument("--max-seeds", type=positive_int, default=20,
                    help="seeds per mutant (default 20)")
    st.add_argument("--jobs", type=positive_int, default=None,
                    help="processes in parallel (default: 1 for --mutants, one per CPU for "
                         "--mutate)")
    st.add_argument("--first", action="store_true",
                    help="stop each mutant at its first failing seed (no detection rate)")
    from . import _campaign
    _campaign.add_engine_options(st, resume=False)
    st.add_argument("--invariant-cost", action="store_true",
                    help="time a hit-heavy run with the invariant checks on and off")
    m = st.add_argument_group("the mutation score (--mutate)")
    m.add_argument("--mutate", type=positive_int, default=None, metavar="N",
                   help="generate N mutants of the probe core and score the stress suite")
    m.add_argument("--seed", type=int, default=1, help="which N mutants (default 1)")
    m.add_argument("--baseline", choices=["current", "round1"], default="current",
                   help="the suite: every scenario under drawn schedules (current), or the "
                        "first round's ten scenarios under its default schedule (round1)")
    m.add_argument("--mutate-seeds", type=positive_int, default=2, metavar="K",
                   help="seeds per scenario in the suite (default 2)")
    m.add_argument("--json", default=None, metavar="FILE",
                   help="also write every mutant's verdict as JSON")


@subcommand("selftest", "check the checkers: the mutation table, invariant cost",
            _selftest_flags)
def _selftest(a) -> int:
    from . import _stress
    if a.mutate is not None:
        return _mutation_score(a)
    if not (a.mutants or a.invariant_cost):
        a.mutants = a.invariant_cost = True
    status = 0
    if a.invariant_cost:
        c = _stress.invariant_cost()
        print(f"invariant checks: {c['off'] * 1e3:.0f} ms without, {c['on'] * 1e3:.0f} ms with "
              f"({c['overhead']:+.1%}) for {c['hits']:,} hits in {c['quanta']:,} quanta on 4 "
              f"CPUs (best of 5); same run with and without: {c['same_run']}")
    if a.mutants:
        from . import _campaign
        results = _stress.mutation_check(a.max_seeds, a.jobs or 1, a.only, rate=not a.first,
                                         **_campaign.engine_options(a))
        _stress.print_mutation_table(results, a.max_seeds)
        status = 0 if all(r.caught for r in results) else 1
    return status


def _mutation_score(a) -> int:
    from . import _mutate
    check_output(a.json, "--json")
    done = [0]

    def progress(r) -> None:
        done[0] += 1
        print(f"[{done[0]}/{a.mutate}] {r.verdict:<12} {r.mutant.ident}"
              f"{'  (' + r.how + ')' if r.how else ''}", file=sys.stderr, flush=True)
    score = _mutate.mutation_score(a.mutate, seed=a.seed, kind=a.baseline,
                                   seeds=a.mutate_seeds, jobs=a.jobs or os.cpu_count() or 1,
                                   progress=progress)
    print(_mutate.format_score(score))
    if a.json:
        with open(a.json, "w") as f:
            f.write(_mutate.to_json(score))
    return 0


# == trace ===============================================================================
def _trace_flags(t: argparse.ArgumentParser) -> None:
    t.add_argument("definitions", nargs="+", metavar="DEFINITION",
                   help="p[:[GRP/]EVENT] [MOD:]SYM[+offs][%%return]|ADDR [FETCHARGS] or "
                        "r[MAXACTIVE][:[GRP/]EVENT] [MOD:]SYM[+0] [FETCHARGS], or "
                        "mem:SYMBOL|ADDR[/LEN][:rwx] (a hardware breakpoint, perf's syntax)")
    t.add_argument("--workload", default="fork_loop", metavar="F[:ARG...],...",
                   help="guest functions to run on every CPU (default fork_loop)")
    t.add_argument("--loops", type=non_negative_int, default=5,
                   help="iterations of the loop workloads")
    _machine_flags(t)
    t.add_argument("--perfetto", metavar="FILE", help="also write the machine's event trace")
    t.add_argument("--plot", metavar="FILE", help="also draw the per-CPU timeline")


@subcommand("trace", "kprobe_events one-liners: define, enable, run, print lines",
            _trace_flags,
            description="Define kprobe events in the kernel's kprobe_events language, run "
                        "workloads on every CPU and print each trace line as it is recorded.  "
                        "Example: smpkprobes trace 'p:myfork do_fork flags=$arg1:x64' "
                        "'r:openret do_sys_open ret=$retval:s32' --workload fork_loop,open_loop "
                        "--cpus 4")
def _trace(a) -> int:
    from . import _trace_export
    from .._errors import KprobeError
    from ..kprobes import _tracefs
    from ..machine._kernel import IMAGES, Image
    _check_arch(a.arch)
    try:
        workloads = _tracefs.parse_workloads(a.workload, a.loops)
    except ValueError as err:
        raise UsageError(f"--workload {a.workload!r}: {err}",
                         "write F[:ARG...],... with integer ARGs") from None
    symbols = {s.name for s in Image.load(IMAGES / a.arch / "vmlinux").symbols}
    for mod in _tracefs.modules_named(a.definitions):      # MOD:SYM loads MOD first
        path = IMAGES / a.arch / f"{mod}.ko"
        if not path.exists():
            raise UsageError(f"no module {mod!r} for {a.arch}",
                             "MOD:SYM names a module of the default kernel (example_mod)")
        symbols |= {s.name for s in Image.load(path, module=mod).symbols}
    missing = [name for name, _ in workloads if name not in symbols]
    if missing:
        raise UsageError(f"--workload: no guest function {', '.join(missing)} in the "
                         f"{a.arch} kernel", "name functions of the default kernel, e.g. "
                                             "fork_loop,open_loop")
    check_output(a.perfetto, "--perfetto")
    check_output(a.plot, "--plot")
    if a.plot:
        try:
            _trace_export.require_matplotlib()
        except _trace_export.PlotUnavailable as err:
            raise UsageError(str(err)) from None
    log = functools.partial(print, file=sys.stderr)
    after = functools.partial(_trace_export.export_all, perfetto=a.perfetto, plot=a.plot, log=log)
    from .._system import Machine
    session = functools.partial(_tracefs.trace_session, boot=Machine)
    if any(d.startswith("mem:") for d in a.definitions):
        from ..hw_breakpoint import _perf
        session = functools.partial(_perf.trace_session, boot=Machine)
    try:
        return trio.run(functools.partial(
            session, a.definitions, workloads, arch=a.arch, cpus=a.cpus,
            seed=a.seed, preempt=a.preempt, out=functools.partial(print, flush=True), err=log,
            after=after))
    except BaseExceptionGroup as group:     # the machine's nursery wraps what its body raised
        bad, other = group.split(KprobeError)
        if bad is None or other is not None:
            raise
        while isinstance(bad, BaseExceptionGroup):
            bad = bad.exceptions[0]
        raise _definition_error(bad) from None


def _definition_error(err: OSError) -> UsageError:
    """The kernel's three-line error_log entry (error, Command, caret) as one line, the caret
    as its column."""
    lines = str(err.strerror).splitlines()
    what = lines[0].replace("trace_kprobe: error: ", "")
    command = next((ln.split("Command:", 1)[1].strip() for ln in lines if "Command:" in ln),
                   None)
    column = getattr(err, "column", None)
    if command and column:
        what += f" at column {column} ({command[column - 1:][:16]!r})"
    where = f" in {command!r}" if command else ""
    return UsageError(f"bad kprobe_events definition{where}: {what}",
                      "fix that DEFINITION; `smpkprobes trace --help` gives the syntax")


# == campaign ============================================================================
def _campaign_flags(c: argparse.ArgumentParser) -> None:
    from . import _campaign
    _campaign.campaign_flags(c)


@subcommand("campaign", "the campaign store: list, show, report", _campaign_flags,
            description="What the campaign store holds: `list` the campaigns, `show ID` one's "
                        "summary, `report ID` its summary and an HTML page with plots.")
def _campaign_cmd(a) -> int:
    from . import _campaign
    return _campaign.campaign_main(a)


# == bench ===============================================================================
def _bench_flags(b: argparse.ArgumentParser) -> None:
    b.add_argument("what", nargs="?", default="all",
                   choices=["all", "machine", "kprobe", "overhead", "watchpoint", "campaign",
                            "memory"])
    b.add_argument("--quick", action="store_true", help="smaller runs")
    b.add_argument("--arch", action="append", help="overhead table for this arch only "
                   "(repeatable; default: every available arch)")


@subcommand("bench", "benchmarks: machine throughput, kprobe hit cost, overhead table",
            _bench_flags)
def _bench(a) -> int:
    from . import _bench
    for arch in a.arch or ():
        _check_arch(arch)
    return _bench.main(a.what, quick=a.quick, arches=a.arch)


if __name__ == "__main__":
    sys.exit(main())

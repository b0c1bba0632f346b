"""Stress testing: run a scenario over many seeds, replay a failure, shrink its schedule.

`smpkprobes stress NAME --seeds A:B [--jobs N]` runs scenario NAME once per seed (in
parallel processes with --jobs), with a progress bar, then a summary.  For each failing
seed it prints the command that replays it: same seed, same flags, so the same run event
for event.  It then shrinks the first failure of each kind:

  1. the failing run's recording (its (cpu, quantum) choices, and its coins: deferred
     traps, IPI delays, preemptions; see `_conductor`) is replayed in full, to check that
     it reproduces the failure;
  2. delta debugging over that recording, seen as overrides of the simplest run (each step
     without a choice runs the next CPU in id order for a fixed quantum, each coin without
     a value is 0): the shortest prefix that still fails, then overrides taken out in
     chunks halving down to one, as long as the same failure remains;
  3. the result, a few STEP@CPU:QUANTUM choices and #STEP.K=V coins, is printed as a command
     with `--replay`, which reproduces that failure.

A failure's kind is its first failed expectation with the numbers taken out, so
"cpu2 ... slot 0x3f000030" and "cpu0 ... slot 0x3f000000" are the same kind.

`smpkprobes selftest --mutants` (`mutation_check`) injects each known bug from
`_mutants` and stresses the scenarios that should catch it until one fails.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import random
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..machine import _conductor
from . import _mutants
from . import _harness as harness
from ._harness import scenarios_dir
from ._usage import UsageError, check_output_dir
from ._shrink import Shrunk as Shrunk, shrink as shrink     # re-exported

SCENARIOS = scenarios_dir()
DEFAULT_TIMEOUT = 120.0
MEMORY_BOUND_MB = 3072    # growth of one run's memory that counts as a livelock
LIVELOCK_BOUND = 8.0      # the wall bound a livelocking mutant is caught by
DEFAULT_OUT = ".smpkprobes"   # where stress writes reproducer files (`--out DIR`)
SHRINK_KINDS = 3          # kinds of failure shrunk per stress run (each costs many replays)
INLINE_CHOICES = 40       # longer recordings go to a file, replayed with --replay @FILE


# == scenarios ===========================================================================
def scenario_names() -> list[str]:
    return sorted(p.stem for p in SCENARIOS.glob("*.py") if not p.stem.startswith("_"))


def describe(name: str) -> str:
    """The first line of a scenario's docstring, read without importing it."""
    try:
        doc = ast.get_docstring(ast.parse((SCENARIOS / f"{name}.py").read_text()))
    except (OSError, SyntaxError):
        return ""
    first = (doc or "").strip().splitlines()[0] if doc else ""
    return first.split(":", 1)[1].strip() if first.startswith(name + ":") else first


@dataclass
class Loaded:
    name: str
    scenario: object             # None for a standalone script (not on the harness)
    configure: object
    doc: str
    path: Path


_loaded: dict[str, Loaded] = {}


def load(name: str) -> Loaded:
    """Import scenarios/NAME.py as a module (not as __main__) and find its `scenario`.
    A standalone script (no `scenario` function) is run as a subprocess instead, with no
    schedule record, so no shrinking."""
    if name in _loaded:
        return _loaded[name]
    path = SCENARIOS / f"{name}.py"
    if not path.exists():
        raise UsageError(f"no scenario {name!r}", "see `smpkprobes list`")
    spec = importlib.util.spec_from_file_location(f"smpkprobes_scenario_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, "scenario", None)
    _loaded[name] = Loaded(name, fn, getattr(module, "configure", None), module.__doc__ or "",
                           path)
    return _loaded[name]


def parse_args(name: str, argv: list[str]) -> argparse.Namespace:
    """The scenario's flags, checked as far as they can be before a run (`UsageError`)."""
    sc = load(name)
    if sc.scenario is None:
        raise LookupError(f"scenario {name!r} is a standalone script, not built on the harness")
    ap = harness.parser(sc.doc, prog=f"smpkprobes stress {name}")
    if sc.configure is not None:
        sc.configure(ap)
    args = ap.parse_args(argv)
    harness.check_args(args)
    return args


# == one run =============================================================================
@dataclass
class Outcome:
    seed: int
    ok: bool
    failures: list[str]
    kind: str | None
    digest: str
    seconds: float
    quanta: int
    schedule: list[tuple[int, int]] | None = None   # kept for failures only
    lines: list[str] = field(default_factory=list)
    coins: list[tuple[str, int, int]] | None = None     # (kind, value, step), with schedule


def failure_kind(failure: str) -> str:
    """A failure with its numbers taken out: what "the same failure" means."""
    s = re.sub(r"0x[0-9a-fA-F]+", "X", failure)
    s = re.sub(r"\d+", "N", s)
    return s[:200]


def run_once(name: str, argv: list[str], timeout: float = DEFAULT_TIMEOUT,
             keep_schedule: bool = False) -> Outcome:
    """Run scenario `name` with command-line `argv` in this process."""
    sc = load(name)
    if sc.scenario is None:
        return _run_script(sc, argv, timeout)
    args = parse_args(name, argv)
    # The run's own bounds end a livelock as a failure of its own kind (see _bounds); the
    # trio deadline below stays as the backstop for a host that never reaches a quantum.
    if args.wall_bound is None:
        args.wall_bound = timeout
    if args.memory_bound is None:
        args.memory_bound = MEMORY_BOUND_MB
    t0 = time.perf_counter()         # the host's wall clock, for the summary only
    box: dict = {}

    async def main():
        with trio.move_on_after(2 * timeout + 10) as scope:
            box["result"] = await harness.run(sc.scenario, args)
        box["timed_out"] = scope.cancelled_caught

    trio.run(main)
    dt = time.perf_counter() - t0
    if box.get("timed_out"):
        return Outcome(args.seed, False, [f"timed out after {timeout:.0f} s (a hang?)"],
                       "timeout", "", dt, 0, None)
    report, m = box["result"]
    kind = failure_kind(report.failures[0]) if report.failures else None
    keep = keep_schedule or not report.ok
    return Outcome(args.seed, report.ok, list(report.failures), kind, m.trace_digest(), dt,
                   m.statistics().quanta, list(m.schedule) if keep else None,
                   list(report.lines), list(m.conductor.coins) if keep else None)


def _run_script(sc: Loaded, argv: list[str], timeout: float) -> Outcome:
    """A standalone scenario script: its exit status is the verdict."""
    seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 0
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(sc.path), *argv], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(seed, False, [f"timed out after {timeout:.0f} s (a hang?)"], "timeout",
                       "", time.perf_counter() - t0, 0)
    lines = proc.stdout.splitlines()
    failures = [] if proc.returncode == 0 else (
        [ln for ln in lines if "FAIL" in ln][:5] or
        [f"exit status {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"])
    return Outcome(seed, proc.returncode == 0, failures,
                   failure_kind(failures[0]) if failures else None, "",
                   time.perf_counter() - t0, 0, None, lines)


def draw_policy(seed: int, extra: list[str] = ()) -> list[str]:
    """The schedule flags stress seed `seed` runs under: quantum lengths, preemption and the
    conductor policy, drawn from the seed (with a generator of their own, so the machine's
    draws are untouched).  A flag the command line gives (`--quanta`, `--preempt` or
    `--no-preempt`, `--schedule`, `--replay`) pins that part for every seed.  So seeds differ
    in their short windows and preemption too, and a seed's replay command names them."""
    rng = random.Random(f"smpkprobes stress policy {seed}")
    quanta = rng.choices(("fine", "mixed", "coarse"), (2, 2, 1))[0]
    preempt = rng.random() < 0.5
    schedule = rng.choice(("random", "random", "pct"))
    given = set(extra)
    out = []
    if "--quanta" not in given:
        out += ["--quanta", quanta]
    if not given & {"--preempt", "--no-preempt"}:
        out += ["--preempt" if preempt else "--no-preempt"]
    if not given & {"--schedule", "--replay"}:
        out += ["--schedule", schedule]
    return out


def seed_argv(extra: list[str], seed: int) -> list[str]:
    """A stress seed's scenario flags: its drawn schedule (see `draw_policy`), the
    command line's flags, and the seed."""
    return [*draw_policy(seed, extra), *extra, "--seed", str(seed)]


def replay_command(name: str, argv: list[str]) -> str:
    return "smpkprobes run " + " ".join(shlex.quote(a) for a in [name, *argv])


# == many seeds ==========================================================================
def parse_seeds(text: str) -> range:
    """"A:B" (seeds A..B-1) or one seed "A"; `UsageError` for anything else."""
    a, sep, b = text.partition(":")
    try:
        seeds = range(int(a), int(b) if sep else int(a) + 1)
    except ValueError:
        raise UsageError(f"--seeds {text!r} is not A:B or A",
                         "give whole numbers, e.g. --seeds 0:100") from None
    if not seeds:
        raise UsageError(f"--seeds {text!r} is empty (seeds run from A up to B-1)",
                         "give A:B with A < B, e.g. --seeds 0:100")
    return seeds


def run_seeds(name: str, extra: list[str], seeds, jobs: int = 1,
              timeout: float = DEFAULT_TIMEOUT, progress: bool = True,
              stop_at_first: bool = False, label: str | None = None, scheduler=None,
              store=None, engine=None) -> list[Outcome]:
    """Run `name` once per seed; return the outcomes in seed order (with `stop_at_first`, up
    to the lowest failing seed).  The seeds run as a campaign (`_campaign`): on `engine`, or
    in this process (`jobs` 1) or on Dask (`jobs` workers, or the cluster at `scheduler`),
    recorded in `store` (a path or a Store; default: in memory)."""
    from . import _campaign
    seeds = seeds if isinstance(seeds, range) else list(seeds)
    with _campaign.Campaign.open(name, extra, jobs, scheduler, store, engine) as camp:
        if isinstance(seeds, range):
            return camp.run(seeds, timeout, progress, stop_at_first, label)
        return [o for s in seeds
                for o in camp.run(range(s, s + 1), timeout, progress, stop_at_first, label)]


class _Progress:
    """A rich progress bar (on stderr) that also counts failures; silent when disabled."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.enabled = enabled
        self.failed = 0
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                               MofNCompleteColumn(), TextColumn("{task.fields[failed]}"),
                               TimeElapsedColumn(), TimeRemainingColumn(),
                               console=Console(stderr=True), transient=False)
            self._task = self._p.add_task(label, total=total, failed="no failures")

    def __enter__(self):
        if self.enabled:
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._p.__exit__(*exc)

    def advance(self, out: Outcome) -> None:
        if not out.ok:
            self.failed += 1
        if self.enabled:
            self._p.update(self._task, advance=1,
                           failed=f"[red]{self.failed} failed" if self.failed else "no failures")


def stress_main(name: str, seeds: range, extra: list[str], jobs: int = 1,
                timeout: float = DEFAULT_TIMEOUT, do_shrink: bool = True,
                shrink_runs: int = 120, progress: bool = True, out=print, scheduler=None,
                store=None, resume: bool = False, new: bool = False,
                out_dir: str = DEFAULT_OUT) -> int:
    """The `smpkprobes stress` command.  Returns the exit status.  The seeds run as a
    campaign (`_campaign`) recorded in `store` (a path; default: in memory): the seeds it
    already holds are not run again, and the summary covers them all."""
    from . import _campaign
    harnessed = load(name).scenario is not None      # fails early for a bad name
    if harnessed:
        parse_args(name, seed_argv(extra, seeds.start))  # and for bad scenario flags
    check_output_dir(out_dir, "--out")
    with _campaign.Campaign.open(name, extra, jobs, scheduler, store, new=new,
                                 resume=resume) as camp:
        return _stress_report(name, seeds, extra, camp, timeout, do_shrink, shrink_runs,
                              progress, out, harnessed, out_dir)


def _stress_report(name, seeds, extra, camp, timeout, do_shrink, shrink_runs, progress, out,
                   harnessed, out_dir: str = DEFAULT_OUT) -> int:
    from rich.console import Console
    from rich.table import Table
    t0 = time.perf_counter()
    outcomes = camp.run(seeds, timeout, progress)
    wall = time.perf_counter() - t0
    failed = [o for o in outcomes if not o.ok]
    cpu_time = sum(o.seconds for o in outcomes)
    if camp.recorded_before:
        out(f"campaign {camp.id} resumed from {camp.store.path}: {camp.recorded_before} of "
            f"these seeds were recorded before, {len(outcomes) - camp.recorded_before} run now")
    out(f"stress {name}: {len(outcomes)} seeds ({seeds.start}:{seeds.stop}), "
        f"{len(outcomes) - len(failed)} passed, {len(failed)} failed; "
        f"{wall:.1f} s wall, {cpu_time:.1f} s in runs, {camp.engine.describe}; "
        f"slowest seed {max(outcomes, key=lambda o: o.seconds).seed} "
        f"({max(o.seconds for o in outcomes):.2f} s)")
    if not failed:
        return 0
    kinds: dict[str, list[Outcome]] = {}
    for o in failed:
        kinds.setdefault(o.kind, []).append(o)
    table = Table(title=f"failures of {name}")
    table.add_column("seeds")
    table.add_column("first failed expectation")
    for kind, group in kinds.items():
        seeds_txt = ", ".join(str(o.seed) for o in group[:12]) + (" ..." if len(group) > 12 else "")
        table.add_row(f"{len(group)}: {seeds_txt}", group[0].failures[0])
    Console(file=sys.stdout, width=120).print(table)
    out("replay a failing seed with:")
    for o in failed:
        out(f"  {replay_command(name, seed_argv(extra, o.seed))}")
    if do_shrink and not harnessed:
        out(f"({name} is a standalone script: no schedule to shrink)")
    if do_shrink and harnessed:
        for number, (kind, group) in enumerate(kinds.items()):
            if number == SHRINK_KINDS:
                out(f"(shrinking only the first {SHRINK_KINDS} kinds of failure)")
                break
            o = group[0]
            stored = camp.kinds().get(kind) or {}
            done = stored.get("first_seed") == o.seed and stored.get("shrunk")
            if not done and o.schedule is None and o.seconds and o.kind != "timeout":
                # Recorded by an earlier session, without its recording: run it once more.
                o = run_once(name, seed_argv(extra, o.seed), timeout, keep_schedule=True)
            out(f"shrinking the schedule of seed {o.seed} ({len(o.schedule or [])} choices, "
                f"{sum(1 for c in o.coins or [] if c[1])} non-zero coins): {o.failures[0]}")
            if done:
                out(f"  {stored['shrunk_note']} (shrunk before, from the store)")
                out(f"  {stored['shrunk']}")
                continue
            if o.schedule is None:
                out("  (no schedule: the run did not finish)")
                continue
            s = shrink(name, extra, o.seed, o.schedule, o.coins, kind, max_runs=shrink_runs,
                       timeout=timeout, log=lambda msg: out(f"  {msg}"), engine=camp.engine)
            if not s.reproduced:
                out("  replaying the recorded schedule did NOT reproduce the failure: "
                    "a determinism bug")
                continue
            policy = parse_args(name, seed_argv(extra, o.seed)).schedule
            choices = _conductor.format_recording(s.recording)
            if len(s) > INLINE_CHOICES:
                path = Path(out_dir) / f"replay-{name}-seed{o.seed}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(harness.recording_file(parse_args(name, seed_argv(
                    extra, o.seed)), choices))
                out(f"  (the recording is long: written to {path})")
                choices = f"@{path}"
            argv = [*seed_argv(extra, o.seed), "--schedule", policy, "--replay", choices]
            note = (f"minimal reproducer ({len(s.recording.choices)} choices and "
                    f"{len(s.recording.coins)} coins on top of round-robin, from {s.original}; "
                    f"{s.runs} replays): {s.failure}")
            out(f"  {note}")
            if not s.recording:
                out("  (the empty recording reproduces it: plain round-robin, no deferred "
                    "trap, no IPI delay, no preemption)")
            out(f"  {replay_command(name, argv)}")
            camp.shrunk(kind, o.seed, replay_command(name, argv), note)
    return 1


# == the mutation check ==================================================================
@dataclass
class MutantResult:
    mutant: str
    bug: str
    caught: bool
    scenario: str | None
    seeds_needed: int | None
    failure: str
    seconds: float
    caught_in: int = 0          # with rate=True: how many of the seeds tried caught it
    tried: int = 0


def mutation_check(max_seeds: int = 20, jobs: int = 1, names: list[str] | None = None,
                   extra: list[str] | None = None, progress: bool = True,
                   timeout: float = 60.0, rate: bool = False, scheduler=None,
                   store=None) -> list[MutantResult]:
    """Inject each mutant; stress the scenarios that hunt it, seed by seed, until one fails
    (with `rate`, over all `max_seeds` seeds, to count how many catch it).  Each mutant and
    scenario is a campaign (`_campaign`), on one engine (`jobs`, `scheduler`) and one store
    (a path; default: in memory), so a second check runs only what the store lacks."""
    from . import _campaign, _store
    with contextlib.ExitStack() as stack:
        engine = _campaign.engine_for(jobs, scheduler)
        stack.callback(engine.close)
        db = _store.Store(store if store is not None else ":memory:")
        stack.callback(db.close)
        return _mutation_check(max_seeds, names, extra, progress, timeout, rate, engine, db)


def _mutation_check(max_seeds, names, extra, progress, timeout, rate, engine, db):
    results = []
    for mname in names or _mutants.names():
        mutant = _mutants.MUTANTS[mname]
        t0 = time.perf_counter()
        result = MutantResult(mname, mutant.bug, False, None, None, "", 0.0)
        # A livelocking mutant is caught by the run's wall bound: keep that bound short.
        bound = min(timeout, LIVELOCK_BOUND) if mutant.livelock else timeout
        for scen in mutant.hunted_by:
            argv = [*(extra or []), "--mutant", mname]
            outs = run_seeds(scen, argv, range(max_seeds), 1, bound, progress,
                             stop_at_first=not rate, label=f"{mname} / {scen}", store=db,
                             engine=engine)
            bad = [o for o in outs if not o.ok]
            if bad:
                result = MutantResult(mname, mutant.bug, True, scen, bad[0].seed + 1,
                                      bad[0].failures[0], 0.0, len(bad), len(outs))
                break
        result.seconds = time.perf_counter() - t0
        results.append(result)
    return results


def print_mutation_table(results: list[MutantResult], max_seeds: int) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"mutation check: each bug injected alone, up to {max_seeds} seeds")
    for col in ("mutant", "bug", "caught", "by", "seeds needed", "caught in", "first failure"):
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(r.mutant, r.bug, "yes" if r.caught else "[red]NO",
                      r.scenario or "-", str(r.seeds_needed or "-"),
                      f"{r.caught_in}/{r.tried} seeds" if r.tried else "-",
                      (r.failure[:90] + "...") if len(r.failure) > 90 else r.failure)
    Console(file=sys.stdout, width=160).print(table)


def invariant_cost(repeats: int = 5) -> dict:
    """Wall time of a hit-heavy run with the invariant checks on and off (best of N)."""
    import functools
    from ..kprobes._core import Kprobe, Kretprobe
    from .._system import Machine

    async def one(inv):
        async with Machine(cpus=4, seed=1, invariants=inv) as m:
            kp = Kprobe(symbol_name="do_fork", pre_handler=lambda p, r: 0,
                        post_handler=lambda p, r, f: None)
            rp = Kretprobe(symbol_name="fib", handler=lambda ri, r: 0, maxactive=8)
            await m.kprobes.register_kprobe(kp)
            await m.kprobes.register_kretprobe(rp)
            t = time.perf_counter()
            async with trio.open_nursery() as n:
                for c in range(4):
                    n.start_soon(functools.partial(m.call, "fork_loop", 2000, cpu=c))
                    n.start_soon(functools.partial(m.call, "fib", 13, cpu=c))
            dt = time.perf_counter() - t
            await m.kprobes.unregister_kprobe(kp)
            await m.kprobes.unregister_kretprobe(rp)
        return dt, m.trace_digest(), m.statistics(), m.kprobes.hits

    on, off = [], []
    for _ in range(repeats):
        off.append(trio.run(one, False))
        on.append(trio.run(one, "raise"))
    best_on, best_off = min(r[0] for r in on), min(r[0] for r in off)
    st = on[0][2]
    return {"on": best_on, "off": best_off, "overhead": best_on / best_off - 1,
            "same_run": on[0][1] == off[0][1], "quanta": st.quanta, "traps": st.traps,
            "hits": on[0][3]}

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
import concurrent.futures as cf
import importlib.util
import multiprocessing
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


def _worker(job: tuple[str, list[str], float]) -> Outcome:
    name, argv, timeout = job
    out = run_once(name, argv, timeout)
    out.lines = []
    return out


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


# == shrinking ===========================================================================
@dataclass
class Shrunk:
    recording: _conductor.Recording     # choices by step and coins by index; the rest simple
    original: int                       # choices + non-zero coins before shrinking
    runs: int
    reproduced: bool
    failure: str

    def __len__(self) -> int:
        return len(self.recording)


def shrink(name: str, extra: list[str], seed: int, schedule: list[tuple[int, int]],
           coins: list[tuple[str, int, int]], kind: str, max_runs: int = 120,
           max_seconds: float = 90.0, timeout: float = DEFAULT_TIMEOUT, log=None) -> Shrunk:
    """Delta-debug the recording (`schedule` and `coins`) of a run of `name` with `extra`
    and `seed` that failed with `kind`, down to a few overrides that still fail that way.

    Each choice and each non-zero coin is one override of the simplest run (round-robin,
    coins 0); taking one out does not move any other, which is what lets delta debugging
    converge."""
    policy = parse_args(name, seed_argv(extra, seed)).schedule
    base = seed_argv(extra, seed)
    t_end = time.perf_counter() + max_seconds
    runs = [0]
    last_failure = [""]
    # (step, key, value): key ("q", step) for a choice, ("c", index) for a coin.
    items = [(step, ("q", step), ch) for step, ch in enumerate(schedule)]
    items += [(key[0], ("c", key), v) for key, v in _conductor.coin_keys(coins) if v]
    items.sort(key=lambda it: (it[0], it[1][0] == "q"))

    def recording(its) -> _conductor.Recording:
        rec = _conductor.Recording()
        for _, (what, n), v in its:
            if what == "q":
                rec.choices[n] = v
            else:
                rec.coins[n] = v
        return rec

    def fails(its) -> bool:
        if runs[0] >= max_runs or time.perf_counter() > t_end:
            return False
        runs[0] += 1
        argv = [*base, "--schedule", policy, "--replay",
                _conductor.format_recording(recording(its))]
        out = run_once(name, argv, timeout)
        hit = [f for f in out.failures if failure_kind(f) == kind]
        if hit:
            last_failure[0] = hit[0]
        return bool(hit)

    best = items
    if not fails(best):
        return Shrunk(recording(best), len(items), runs[0], False, "")
    failure = last_failure[0]
    # 1. the shortest failing prefix, by step: prefixes of 0, 1, 2, 4... steps first (a
    # failure need not be monotone in the prefix), then a binary search below the first
    # that fails.  Every prefix kept was replayed.
    n = len(schedule)
    lo, hi = 0, n
    length = 0
    while length < n:
        if fails([it for it in best if it[0] < length]):
            hi, failure = length, last_failure[0]
            break
        lo = length + 1
        length = min(n, max(1, 2 * length))
    while lo < hi:
        mid = (lo + hi) // 2
        if fails([it for it in best if it[0] < mid]):
            hi, failure = mid, last_failure[0]
        else:
            lo = mid + 1
    best = [it for it in best if it[0] < hi]
    if log:
        log(f"prefix: {hi} of {len(schedule)} steps, {len(best)} of {len(items)} overrides")
    # 2. take overrides out, in chunks halving down to one
    size = max(1, len(best) // 2)
    while best:
        i = 0
        while i < len(best):
            cand = best[:i] + best[i + size:]
            if fails(cand):
                best, failure = cand, last_failure[0]
            else:
                i += size
        if size == 1:
            break
        size //= 2
    if log:
        log(f"shrunk: {len(best)} overrides after {runs[0]} replays")
    return Shrunk(recording(best), len(items), runs[0], True, failure)


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
              stop_at_first: bool = False, label: str | None = None) -> list[Outcome]:
    """Run `name` once per seed; return the outcomes in seed order."""
    seeds = list(seeds)
    outcomes: dict[int, Outcome] = {}
    jobs_list = [(name, seed_argv(extra, s), timeout) for s in seeds]
    bar = _Progress(label or name, len(seeds), enabled=progress)
    with bar:
        if jobs <= 1:
            for job, s in zip(jobs_list, seeds):
                out = run_once(*job)
                outcomes[s] = out
                bar.advance(out)
                if stop_at_first and not out.ok:
                    break
        else:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                futures = {pool.submit(_worker, job): s for job, s in zip(jobs_list, seeds)}
                for fut in cf.as_completed(futures):
                    out = fut.result()
                    outcomes[futures[fut]] = out
                    bar.advance(out)
                    if stop_at_first and not out.ok:
                        for f in futures:
                            f.cancel()
                        break
    return [outcomes[s] for s in seeds if s in outcomes]


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
                shrink_runs: int = 120, progress: bool = True, out=print,
                out_dir: str = DEFAULT_OUT) -> int:
    """The `smpkprobes stress` command.  Returns the exit status.  Reproducer recordings too
    long for the command line are written under `out_dir` (created when needed)."""
    from rich.console import Console
    from rich.table import Table
    harnessed = load(name).scenario is not None      # fails early for a bad name
    if harnessed:
        parse_args(name, seed_argv(extra, seeds.start))  # and for bad scenario flags
    check_output_dir(out_dir, "--out")
    t0 = time.perf_counter()
    outcomes = run_seeds(name, extra, seeds, jobs, timeout, progress)
    wall = time.perf_counter() - t0
    failed = [o for o in outcomes if not o.ok]
    cpu_time = sum(o.seconds for o in outcomes)
    out(f"stress {name}: {len(outcomes)} seeds ({seeds.start}:{seeds.stop}), "
        f"{len(outcomes) - len(failed)} passed, {len(failed)} failed; "
        f"{wall:.1f} s wall, {cpu_time:.1f} s in runs, {jobs} job(s); "
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
            out(f"shrinking the schedule of seed {o.seed} ({len(o.schedule or [])} choices, "
                f"{sum(1 for c in o.coins or [] if c[1])} non-zero coins): {o.failures[0]}")
            if o.schedule is None:
                out("  (no schedule: the run did not finish)")
                continue
            s = shrink(name, extra, o.seed, o.schedule, o.coins, kind, max_runs=shrink_runs,
                       timeout=timeout, log=lambda msg: out(f"  {msg}"))
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
            out(f"  minimal reproducer ({len(s.recording.choices)} choices and "
                f"{len(s.recording.coins)} coins on top of round-robin, from {s.original}; "
                f"{s.runs} replays): {s.failure}")
            if not s.recording:
                out("  (the empty recording reproduces it: plain round-robin, no deferred "
                    "trap, no IPI delay, no preemption)")
            out(f"  {replay_command(name, argv)}")
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
                   timeout: float = 60.0, rate: bool = False) -> list[MutantResult]:
    """Inject each mutant; stress the scenarios that hunt it, seed by seed, until one fails
    (with `rate`, over all `max_seeds` seeds, to count how many catch it)."""
    results = []
    for mname in names or _mutants.names():
        mutant = _mutants.MUTANTS[mname]
        t0 = time.perf_counter()
        result = MutantResult(mname, mutant.bug, False, None, None, "", 0.0)
        # A livelocking mutant is caught by the run's wall bound: keep that bound short.
        bound = min(timeout, LIVELOCK_BOUND) if mutant.livelock else timeout
        for scen in mutant.hunted_by:
            argv = [*(extra or []), "--mutant", mname]
            outs = run_seeds(scen, argv, range(max_seeds), jobs, bound, progress,
                             stop_at_first=not rate, label=f"{mname} / {scen}")
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

"""The mutation score: generated probe-core bugs, and how many of them the stress suite kills.

`smpkprobes selftest --mutate N [--seed S]` measures the stress suite against bugs that nobody
wrote by hand.  The hand-written catalogue (`_mutants`) says little about bugs that its
authors did not think of, so this module makes them mechanically:

1. **Generate.**  Walk the AST of every probe-core module (smpkprobes/kprobes/, except the
   debugfs and tracefs views) and list every place where one of these operators applies:

   - `compare`: swap a comparison (`<` and `<=`, `>` and `>=`, `==` and `!=`, `is` and
     `is not`, `in` and `not in`);
   - `off-by-one`: an integer literal n becomes n + 1 or n - 1;
   - `bool`: `and` and `or` swapped; a `not` dropped; an `if` condition negated;
   - `drop`: a statement (call, assignment, raise, del) becomes `pass`;
   - `skip-await`: an `await ...` statement becomes `pass`;
   - `swap-awaits`: two consecutive statements that both await run in the other order.

   Every mutant is one textual edit of the source at the node's position, so it prints as a
   small unified diff.  The candidate list is sorted, and `--seed` draws N of them with its
   own `random.Random`: the same N and seed give the same mutants on the same code.

2. **Cover.**  One unmutated run of the suite, split over the `--jobs` processes, measured
   by coverage.py (its C tracer, limited to the probe-core files) records which probe-core
   lines each run reaches, how long it took, and its trace digest.  The lines that run while
   the package is imported (module constants, class bodies, `def` lines with their
   defaults) count as reached by every run.  A mutant on a line that no run reaches cannot
   be killed; it is reported as `not reached` (a survivor) and not run.

3. **Run.**  Each mutant runs in a fresh Python process, against the runs that reach its
   lines only (a run that never executes the mutated line behaves as unmutated), cheapest
   first.  A bootstrap installs an import finder that serves the mutated source for that one
   module, before smpkprobes is imported; nothing in the runtime package knows about it.
   The child stops at the first failure.  Each run keeps the scenario's own bounds (its
   wall bound is the larger of `timeout` and 4x its unmutated time), and the parent kills a
   child that exceeds the sum: a hang or a livelock is a kill of its own kind (`hang`).

4. **Judge.**  A mutant is `killed` (a scenario failed: an expectation, an invariant, an
   oops, a crash, a hang), `equivalent?` (it survived, and every run's trace digest equals
   the unmutated run's: nothing observable changed), or `survived` (the runs changed, and no
   check noticed).  The score is killed / (all mutants that compiled).

Selecting the runs by coverage is what mutation tools call test selection: on the probe
core it cuts the work several-fold, since most mutants sit on lines that only a few
scenarios reach (the optimizer's, the watchpoints', the jprobes').

Why not a mutation-testing library (mutmut, cosmic-ray)?  Both drive a test runner (pytest)
over a rewritten source tree.  Our suite is the stress scenarios under seeded schedules, with
a per-run wall bound and trace digests to tell "equivalent" from "unnoticed"; an import
finder in a child process gives that with no copy of the tree and no change to the package.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from ._mutate_ops import PACKAGE, Mutant, apply, core_modules, diff
from ._mutate_ops import candidates as candidates          # re-exported: the public face
from ._mutate_ops import compiles as compiles
from ._mutate_ops import draw as draw
from ._mutate_ops import generate as generate

# The scenarios of the first round, and its schedule: the baseline the score is compared with.
ROUND1 = ("concurrent_hits", "fault_injection", "jprobe_example", "kprobe_example",
          "kretprobe_example", "maxactive_contention", "module_gone", "reentrancy",
          "singlestep_state", "unregister_while_firing")


# == the suite ===========================================================================
@dataclass(frozen=True)
class Job:
    scenario: str
    argv: tuple[str, ...]

    def command(self) -> str:
        return "smpkprobes run " + " ".join([self.scenario, *self.argv])


def suite(kind: str = "current", seeds: int = 2) -> list[Job]:
    """The runs that judge a mutant, cheapest first.

    "round1": the first round's ten scenarios under its default schedule (random, no
    preemption), seeds 0..seeds-1.  "current": every scenario on the harness, each seed under
    the stress mix that `_stress.draw_policy` gives it (schedule, preemption, quanta)."""
    from . import _stress
    jobs = []
    if kind == "round1":
        for s in range(seeds):
            for name in ROUND1:
                jobs.append(Job(name, ("--seed", str(s), "--quiet")))
        return jobs
    names = [n for n in _stress.scenario_names() if _stress.load(n).scenario is not None]
    for s in range(seeds):
        for name in names:
            jobs.append(Job(name, (*_stress.draw_policy(s), "--seed", str(s), "--quiet")))
    return jobs


# == running in a child ==================================================================
# The child's bootstrap: installs the finder (and, for the covered baseline, starts
# coverage) before smpkprobes is imported, so the mutated module is the one every other
# module gets, and the lines run at import time are measured.  It imports nothing of
# smpkprobes itself first.
_BOOT = r'''
import importlib.abc, importlib.machinery, json, sys
spec = json.loads(sys.argv[1])
cov = None
if spec.get("cover"):
    import coverage
    cov = coverage.Coverage(data_file=None, include=spec["include"], config_file=False)
    cov.start()
if spec["module"]:
    class _Loader(importlib.machinery.SourceFileLoader):
        def get_data(self, path):
            if path == self.path:
                return spec["source"].encode()
            return super().get_data(path)
        def path_stats(self, path):
            raise OSError("no bytecode cache for a mutant")
        def set_data(self, *a, **k):
            pass
    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != spec["module"]:
                return None
            s = importlib.machinery.PathFinder.find_spec(fullname, path)
            s.loader = _Loader(fullname, s.origin)
            return s
    sys.meta_path.insert(0, _Finder())
from smpkprobes.tools import _mutate
_mutate._child(spec, cov)
'''


def _lines(cov) -> list[list]:
    """The probe-core lines `cov` measured since it was last erased; erases it."""
    cov.stop()
    data = cov.get_data()
    out = sorted([f, n] for f in data.measured_files() for n in (data.lines(f) or ()))
    cov.erase()
    return out


def _child(spec: dict, cov=None) -> None:
    """Run the jobs in this process; print one JSON line per job on the real stdout.  With
    coverage (the baseline), the first line is the lines run at import ("prelude"), and
    each job's record carries the lines it reached."""
    from . import _stress
    real = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)                       # scenario output is not the protocol
    if cov is not None:
        real.write(json.dumps({"prelude": _lines(cov)}) + "\n")
    for scenario, argv, timeout in spec["jobs"]:
        if cov is not None:
            cov.start()
        t0 = time.perf_counter()
        try:
            out = _stress.run_once(scenario, list(argv), timeout)
            rec = {"ok": out.ok, "digest": out.digest,
                   "failure": out.failures[0] if out.failures else "",
                   "kind": "hang" if out.kind == "timeout" else "fail"}
        except BaseException as exc:          # noqa: BLE001 - the mutant broke the host
            rec = {"ok": False, "digest": "", "kind": "crash",
                   "failure": f"{type(exc).__name__}: {exc}"}
        rec["seconds"] = time.perf_counter() - t0
        if cov is not None:
            rec["covered"] = _lines(cov)
        real.write(json.dumps(rec) + "\n")
        real.flush()
        if not rec["ok"] and spec.get("stop_at_first", True):
            break
    real.flush()


def _spawn(module: str | None, source: str | None, jobs: list[tuple[Job, float]],
           wall: float, cover: bool = False) -> tuple[list[dict], list | None, float]:
    """Run `jobs` (each with its own wall bound) in a child, optionally with one module
    mutated.  With `cover`, every job runs (no stop at the first failure) under coverage.
    Returns the per-job records, the prelude's lines if covered, and the seconds it took."""
    spec = {"module": module, "source": source, "cover": cover, "stop_at_first": not cover,
            "include": [str(p) for _, p in core_modules()],
            "jobs": [(j.scenario, list(j.argv), t) for j, t in jobs]}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _BOOT, json.dumps(spec)],
                              capture_output=True, text=True, timeout=wall)
        text, hung = proc.stdout, False
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        hung = True
    records, prelude = [], None
    for ln in text.splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if "prelude" in rec:
            prelude = rec["prelude"]
        else:
            records.append(rec)
    if hung:
        records.append({"ok": False, "digest": "", "kind": "hang",
                        "failure": f"no verdict within {wall:.0f} s of wall time (a hang?)"})
    elif len(records) < len(jobs) and (not records or records[-1]["ok"]):
        err = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        records.append({"ok": False, "digest": "", "kind": "crash",
                        "failure": f"the run died: {err}"})
    return records, prelude, time.perf_counter() - t0


@dataclass
class Baseline:
    """The unmutated suite, measured: per run its digest, its seconds and the probe-core
    lines it reaches; the lines every run reaches (import time)."""
    jobs: list[Job]
    digests: list[str]
    seconds: list[float]
    covered: list[frozenset]
    prelude: frozenset
    dropped: list[tuple[str, str]]
    elapsed: float

    def reaching(self, lines: set) -> list[int]:
        """The runs that execute any of `lines`, cheapest first."""
        if lines & self.prelude:
            chosen = list(range(len(self.jobs)))
        else:
            chosen = [i for i, cov in enumerate(self.covered) if lines & cov]
        return sorted(chosen, key=lambda i: (self.seconds[i], i))


def baseline(the_suite: list[Job], timeout: float, jobs: int = 2) -> Baseline:
    """Run the unmutated suite under coverage, split over `jobs` processes."""
    t0 = time.perf_counter()
    parts = [the_suite[i::max(1, jobs)] for i in range(max(1, jobs))]
    parts = [p for p in parts if p]
    # Coverage slows a run down (about 1.5x): the bound of each run is loosened to match.
    budget = [[(j, 3 * timeout) for j in part] for part in parts]
    with cf.ThreadPoolExecutor(max_workers=len(parts)) as pool:
        outs = list(pool.map(lambda b: _spawn(None, None, b, wall=600.0 + 4 * timeout * len(b),
                                              cover=True), budget))
    by_job: dict[Job, dict] = {}
    prelude: set = set()
    for part, (records, pre, _) in zip(parts, outs):
        if len(records) != len(part):
            raise RuntimeError("the unmutated suite did not finish: "
                               f"{(records[-1]['failure'] if records else 'no record')}")
        prelude |= {(f, n) for f, n in pre or ()}
        by_job.update(zip(part, records))
    recs = [by_job[j] for j in the_suite]
    keep = [i for i, r in enumerate(recs) if r["ok"]]
    return Baseline(
        jobs=[the_suite[i] for i in keep],
        digests=[recs[i]["digest"] for i in keep],
        seconds=[recs[i]["seconds"] for i in keep],
        covered=[frozenset((f, n) for f, n in recs[i]["covered"]) for i in keep],
        prelude=frozenset(prelude),
        dropped=[(j.command(), r["failure"]) for j, r in zip(the_suite, recs) if not r["ok"]],
        elapsed=time.perf_counter() - t0)


# == judging =============================================================================
@dataclass
class MutantResult:
    mutant: Mutant
    verdict: str                 # killed, survived, equivalent?, not reached
    how: str = ""                # the kill kind (fail, hang, crash) or ""
    by: str = ""                 # the replay command of the run that killed it
    failure: str = ""
    runs: int = 0
    seconds: float = 0.0
    diff: str = ""


@dataclass
class Score:
    suite: str
    seed: int
    results: list[MutantResult] = field(default_factory=list)
    baseline_seconds: float = 0.0
    dropped: list[tuple[str, str]] = field(default_factory=list)   # failed unmutated

    @property
    def killed(self) -> int:
        return sum(r.verdict == "killed" for r in self.results)

    @property
    def score(self) -> float:
        return self.killed / len(self.results) if self.results else 0.0

    def count(self, verdict: str) -> int:
        return sum(r.verdict == verdict for r in self.results)


def mutation_score(n: int, seed: int = 1, kind: str = "current", seeds: int = 2,
                   jobs: int = 2, timeout: float = 30.0, wall: float | None = None,
                   progress=None) -> Score:
    """Draw N mutants with `seed`, run the suite against each, and score it."""
    return score_mutants(draw(n, seed), suite(kind, seeds), kind, seed, jobs, timeout, wall,
                         progress)


def score_mutants(chosen: list[tuple[Mutant, str]], the_suite: list[Job], kind: str = "",
                  seed: int = 0, jobs: int = 2, timeout: float = 30.0,
                  wall: float | None = None, progress=None) -> Score:
    """Run `the_suite` against each mutant of `chosen` and score it (see the docstring).
    `wall`, if given, bounds each mutant's child process instead of the sum of its runs'
    bounds."""
    score = Score(kind, seed)
    # The unmutated baseline.  A run that fails unmutated cannot judge a mutant: it leaves
    # the suite, and says so.
    base = baseline(the_suite, timeout, jobs)
    score.baseline_seconds, score.dropped = base.elapsed, base.dropped
    paths = dict(core_modules())

    def one(item: tuple[Mutant, str]) -> MutantResult:
        mutant, source = item
        path = str(paths[mutant.module])
        res = MutantResult(mutant, "survived",
                           diff=diff(source, mutant, os.path.relpath(path, PACKAGE.parent)))
        lines = {(path, ln) for ln in range(mutant.line, max(e[2] for e in mutant.edits) + 1)}
        chosen_runs = base.reaching(lines)
        if not chosen_runs:
            res.verdict = "not reached"
            return res
        runs = [(base.jobs[i], max(timeout, 4 * base.seconds[i])) for i in chosen_runs]
        bound = wall or 60.0 + sum(t for _, t in runs)
        records, _, res.seconds = _spawn(mutant.module, apply(source, mutant), runs, bound)
        res.runs = len(records)
        bad = next((i for i, r in enumerate(records) if not r["ok"]), None)
        if bad is not None:
            res.verdict, res.how = "killed", records[bad]["kind"]
            res.failure = records[bad]["failure"]
            res.by = runs[min(bad, len(runs) - 1)][0].command()
        elif [r["digest"] for r in records] == [base.digests[i] for i in chosen_runs]:
            res.verdict = "equivalent?"
        return res

    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for res in pool.map(one, chosen):
            score.results.append(res)
            if progress:
                progress(res)
    return score


def format_score(score: Score, show_diffs: bool = True) -> str:
    out = [f"mutation score ({score.suite} suite, --seed {score.seed}): "
           f"{score.killed}/{len(score.results)} killed = {100 * score.score:.0f}%  "
           f"(survived {score.count('survived')}, equivalent? {score.count('equivalent?')}, "
           f"not reached {score.count('not reached')})"]
    for cmd, why in score.dropped:
        out.append(f"  (left out of the suite, it fails unmutated: {cmd}: {why})")
    kinds: dict[str, int] = {}
    for r in score.results:
        if r.verdict == "killed":
            kinds[r.how] = kinds.get(r.how, 0) + 1
    if kinds:
        out.append("  killed by: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    for r in score.results:
        if r.verdict != "killed":
            out.append(f"{r.verdict.upper()}: {r.mutant.ident}")
            if show_diffs:
                out.extend("    " + ln for ln in r.diff.rstrip().splitlines())
    return "\n".join(out)


def to_json(score: Score) -> str:
    return json.dumps({"suite": score.suite, "seed": score.seed, "killed": score.killed,
                       "total": len(score.results),
                       "results": [{**asdict(r), "mutant": r.mutant.ident}
                                   for r in score.results]}, indent=1)

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

2. **Cover.**  One unmutated run of the suite, with a line tracer limited to the probe-core
   files, finds which lines the suite reaches.  A mutant on a line it never reaches cannot
   be killed by it; it is reported as `not reached` (a survivor) and not run.

3. **Run.**  Each mutant runs in a fresh Python process.  A bootstrap installs an import
   finder that serves the mutated source for that one module, before smpkprobes is imported;
   nothing in the runtime package knows about it.  The child runs the suite's jobs in order
   and stops at the first failure.  The parent kills a child that exceeds its wall-clock
   bound: a hang or a livelock is a kill of its own kind (`hang`).

4. **Judge.**  A mutant is `killed` (a scenario failed: an expectation, an invariant, an
   oops, a crash, a hang), `equivalent?` (it survived, and every run's trace digest equals
   the unmutated run's: nothing observable changed), or `survived` (the runs changed, and no
   check noticed).  The score is killed / (all mutants that compiled).

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
# The child's bootstrap: installs the finder before smpkprobes is imported, so the mutated
# module is the one every other module gets.  It imports nothing of smpkprobes itself first.
_BOOT = r'''
import importlib.abc, importlib.machinery, json, sys
spec = json.loads(sys.argv[1])
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
_mutate._child(spec)
'''


def _child(spec: dict) -> None:
    """Run the jobs in this process; print one JSON line per job on the real stdout."""
    from . import _stress
    real = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)                       # scenario output is not the protocol
    tracer = _LineTracer() if spec.get("cover") else None
    for scenario, argv in spec["jobs"]:
        if tracer:
            tracer.start()
        try:
            out = _stress.run_once(scenario, list(argv), spec["timeout"])
            rec = {"ok": out.ok, "digest": out.digest,
                   "failure": out.failures[0] if out.failures else "",
                   "kind": "hang" if out.kind == "timeout" else "fail"}
        except BaseException as exc:          # noqa: BLE001 - the mutant broke the host
            rec = {"ok": False, "digest": "", "kind": "crash",
                   "failure": f"{type(exc).__name__}: {exc}"}
        finally:
            if tracer:
                tracer.stop()
        real.write(json.dumps(rec) + "\n")
        real.flush()
        if not rec["ok"] and spec.get("stop_at_first", True):
            break
    if tracer:
        real.write(json.dumps({"covered": tracer.covered()}) + "\n")
    real.flush()


class _LineTracer:
    """Which probe-core lines ran: a tracer that only follows frames of those files."""

    def __init__(self):
        self.files = {str(p) for _, p in core_modules()}
        self.lines: set[tuple[str, int]] = set()

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines.add((frame.f_code.co_filename, frame.f_lineno))
        return self._local

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename in self.files:
            self.lines.add((frame.f_code.co_filename, frame.f_code.co_firstlineno))
            return self._local
        return None

    def start(self):
        import threading
        threading.settrace(self._global)
        sys.settrace(self._global)

    def stop(self):
        import threading
        sys.settrace(None)
        threading.settrace(None)

    def covered(self) -> list[list]:
        return sorted([f, n] for f, n in self.lines)


def _spawn(module: str | None, source: str | None, jobs: list[Job], timeout: float,
           wall: float, cover: bool = False) -> tuple[list[dict], str | None, float]:
    """Run `jobs` in a child, optionally with one module mutated.  Returns the per-job
    records, the covered lines record if asked, and the seconds it took."""
    spec = {"module": module, "source": source, "timeout": timeout, "cover": cover,
            "jobs": [(j.scenario, list(j.argv)) for j in jobs]}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _BOOT, json.dumps(spec)],
                              capture_output=True, text=True, timeout=wall)
        text, hung = proc.stdout, False
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        hung = True
    records, covered = [], None
    for ln in text.splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if "covered" in rec:
            covered = rec["covered"]
        else:
            records.append(rec)
    if hung:
        records.append({"ok": False, "digest": "", "kind": "hang",
                        "failure": f"no verdict within {wall:.0f} s of wall time (a hang?)"})
    elif len(records) < len(jobs) and (not records or records[-1]["ok"]):
        err = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        records.append({"ok": False, "digest": "", "kind": "crash",
                        "failure": f"the run died: {err}"})
    return records, covered, time.perf_counter() - t0


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
    """Run `the_suite` against each mutant of `chosen` and score it (see the docstring)."""
    score = Score(kind, seed)
    # the unmutated baseline: digests per job, and which lines the suite reaches
    base, covered, score.baseline_seconds = _spawn(None, None, the_suite, timeout,
                                                   wall=600.0 + 60 * len(the_suite),
                                                   cover=True)
    if len(base) != len(the_suite):
        raise RuntimeError("the unmutated suite did not finish: "
                           f"{(base[-1]['failure'] if base else 'no record')}")
    # A run that fails unmutated cannot judge a mutant: it leaves the suite, and says so.
    score.dropped = [(job.command(), r["failure"]) for job, r in zip(the_suite, base)
                     if not r["ok"]]
    keep = [i for i, r in enumerate(base) if r["ok"]]
    the_suite = [the_suite[i] for i in keep]
    digests = [base[i]["digest"] for i in keep]
    reached = {(f, ln) for f, ln in covered or []}
    per_job = score.baseline_seconds / max(1, len(the_suite))
    wall = wall or max(60.0, 20 * per_job * len(the_suite))
    paths = dict(core_modules())

    def one(item: tuple[Mutant, str]) -> MutantResult:
        mutant, source = item
        path = str(paths[mutant.module])
        res = MutantResult(mutant, "survived",
                           diff=diff(source, mutant, os.path.relpath(path, PACKAGE.parent)))
        lines = range(mutant.line, max(e[2] for e in mutant.edits) + 1)
        if reached and not any((path, ln) in reached for ln in lines):
            res.verdict = "not reached"
            return res
        records, _, res.seconds = _spawn(mutant.module, apply(source, mutant), the_suite,
                                         timeout, wall)
        res.runs = len(records)
        bad = next((i for i, r in enumerate(records) if not r["ok"]), None)
        if bad is not None:
            res.verdict, res.how = "killed", records[bad]["kind"]
            res.failure = records[bad]["failure"]
            job = the_suite[min(bad, len(the_suite) - 1)]
            res.by = job.command()
        elif [r["digest"] for r in records] == digests:
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

"""Campaigns: a stress run's seeds farmed out to an engine, each recorded in the store as it
comes back.

The client (the `smpkprobes stress` process) cuts the seeds still to run into chunks and
hands them to an engine:

  * `LocalEngine`: this process, one chunk after another (`--jobs 1`, no `--scheduler`: no
    Dask needed, as before);
  * `DaskEngine`: Dask distributed futures, on an embedded `LocalCluster` of `--jobs` worker
    processes (processes, not threads: a run holds the GIL) or on an existing cluster
    (`--scheduler tcp://HOST:8786`).  At most a few chunks per worker are in flight; results
    stream back with `as_completed`.  A worker that dies has its chunk run again elsewhere
    (Dask's scheduler does that); a chunk that keeps killing workers is split into single
    seeds, and a seed that still kills its worker when it runs alone is recorded as a
    "crash".  Workers of an embedded cluster exit when the client has gone (`dask_setup`).

Whatever the engine, only the client writes to the store, one transaction per finished chunk,
so a killed client loses at most the chunks in flight, and a resumed one runs exactly the
seeds the store does not have.  Shrinking goes through the engine too: delta debugging tries
its candidate recordings a window at a time (`first_failing`), as many at once as there are
workers, and takes the first that fails, which is what the one-at-a-time search would take.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from . import _stress
from ._store import CampaignInfo, SeedRow, Store, StoreError, code_digest

CHUNK_MAX = 16          # seeds per chunk, at most (a chunk is the unit of loss and of retry)
IN_FLIGHT = 3           # chunks per worker in flight: enough to keep it busy between results


class CampaignError(Exception):
    """A campaign that cannot run as asked; the message ends with what to do."""


# == on the worker ========================================================================
# A worker process may run several tasks at once (a `dask worker --nthreads 4`); a run seeds
# trio's process-wide run order from its seed when its machine starts (`_machine`), so runs in
# one process take turns.
_RUN_LOCK = threading.Lock()


@dataclass
class ChunkResult:
    worker: str                      # the Dask worker's address, or "local"
    code_digest: str                 # of the smpkprobes that ran it
    outcomes: list                   # of _stress.Outcome, in seed order
    started: float = 0.0             # Unix time on the worker
    finished: float = 0.0


def _worker_name() -> str:
    try:
        from distributed import get_worker
        return get_worker().address
    except (ImportError, ValueError):
        return "local"


CLIENT_PID_KEY = "smpkprobes.campaign-client-pid"   # in the Dask config a LocalCluster inherits
PARENT_POLL = 0.5                                   # seconds between a worker's checks


def dask_setup(worker) -> None:
    """Dask preload hook, run in each worker process of an embedded LocalCluster as it
    starts: the worker exits when the client that started it has gone.

    Dask's own guard is a pipe from the client that the worker reads until it closes.  With
    forked workers that guard fails: two workers forked at about the same time can each
    inherit the other's pipe end, and then both outlive a SIGKILLed client for ever.  So a
    thread watches the parent's pid too.
    """
    import dask
    client_pid = dask.config.get(CLIENT_PID_KEY, None)
    if client_pid is None:
        return

    def watch() -> None:
        while os.getppid() == client_pid:
            time.sleep(PARENT_POLL)
        os._exit(1)

    threading.Thread(target=watch, name="smpkprobes client watch", daemon=True).start()


def run_chunk(name: str, extra: list[str], seeds: list[int], timeout: float) -> ChunkResult:
    """Run `name` once per seed (on a worker, or here)."""
    with _RUN_LOCK:
        started = time.time()
        outs = []
        for seed in seeds:
            out = _stress.run_once(name, _stress.seed_argv(extra, seed), timeout)
            out.lines = []
            outs.append(out)
        return ChunkResult(_worker_name(), code_digest(), outs, started, time.time())


def replay_failures(name: str, argv: list[str], timeout: float) -> list[str]:
    """One replay for shrinking: the run's failures."""
    with _RUN_LOCK:
        return _stress.run_once(name, argv, timeout).failures


def chunks_of(seeds: Sequence[int], workers: int) -> list[list[int]]:
    """Cut `seeds` into chunks: about eight per worker, between 1 and CHUNK_MAX seeds."""
    size = max(1, min(CHUNK_MAX, len(seeds) // (8 * max(1, workers))))
    return [list(seeds[i:i + size]) for i in range(0, len(seeds), size)]


# == engines ==============================================================================
class LocalEngine:
    """This process, one chunk after another."""

    workers = 1
    describe = "1 job"

    def stream(self, name, extra, chunks, timeout) -> Iterator[tuple[list[int], ChunkResult]]:
        for chunk in chunks:
            yield chunk, run_chunk(name, extra, chunk, timeout)

    def replays(self, name: str, argvs: list[list[str]], timeout: float) -> list[list[str]]:
        return [replay_failures(name, argv, timeout) for argv in argvs]

    def close(self) -> None:
        pass


def _multiprocessing_method() -> str:
    # A forked worker starts in a fraction of a second with smpkprobes already imported; a
    # spawned one imports everything again (seconds).  From Python 3.12 on, forking a
    # multi-threaded process (the client runs Dask's event loop in a thread) is deprecated.
    if sys.version_info < (3, 12) and "fork" in _mp_methods():
        return "fork"
    return "spawn"


def _mp_methods() -> list[str]:
    import multiprocessing
    return multiprocessing.get_all_start_methods()


class DaskEngine:
    """Dask distributed: an embedded LocalCluster of `jobs` worker processes, or the cluster
    whose scheduler is at `scheduler`."""

    def __init__(self, jobs: int = 2, scheduler: str | None = None):
        try:
            import dask
            import distributed
        except ImportError:
            raise CampaignError("--jobs above 1 and --scheduler run on Dask distributed, which "
                                "is not installed (pip install 'smpkprobes[cluster]')") from None
        self._distributed = distributed
        self.cluster = None
        if scheduler:
            try:
                self.client = distributed.Client(scheduler, timeout="10s")
            except (OSError, TimeoutError) as err:
                raise CampaignError(f"no Dask scheduler answers at {scheduler}: {err} (start "
                                    f"one with `dask scheduler`, or drop --scheduler)") from None
            where = f"the cluster at {scheduler}"
        else:
            import logging
            dask.config.set({"distributed.worker.multiprocessing-method":
                             _multiprocessing_method(),
                             "distributed.scheduler.allowed-failures": 2,
                             "distributed.worker.preload": [__name__],
                             CLIENT_PID_KEY: os.getpid()})
            # The scheduler serves HTTP even without a dashboard, by default on port 8787,
            # which another cluster may hold: take any free port on loopback.
            self.cluster = distributed.LocalCluster(
                n_workers=jobs, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL,
                scheduler_port=0)
            self.client = distributed.Client(self.cluster)
            where = "an embedded LocalCluster"
        n = len(self.client.scheduler_info().get("workers", {}))
        if scheduler and n == 0:
            try:
                self.client.wait_for_workers(1, timeout=30)
            except TimeoutError:
                self.client.close()
                raise CampaignError(f"no Dask worker joined the scheduler at {scheduler} in "
                                    f"30 s (start some with `dask worker {scheduler} "
                                    f"--nthreads 1`)") from None
            n = len(self.client.scheduler_info().get("workers", {}))
        self.workers = max(1, n)
        self.describe = f"{n} Dask worker(s) on {where}"

    def stream(self, name, extra, chunks, timeout) -> Iterator[tuple[list[int], ChunkResult]]:
        """Yield (chunk, result) as chunks finish; at most IN_FLIGHT chunks per worker are
        submitted at a time.  Closing the generator cancels what is still in flight."""
        from distributed import KilledWorker, as_completed
        pending = list(reversed(chunks))
        inflight: dict = {}
        suspects: list[list[int]] = []     # lone seeds on a worker that died, to try alone
        alone = False                      # set once suspects run one at a time
        done = as_completed()

        def submit(chunk):
            fut = self.client.submit(run_chunk, name, extra, chunk, timeout, pure=False,
                                     key=f"smpkprobes-{name}-{chunk[0]}-{os.urandom(6).hex()}")
            inflight[fut] = chunk
            done.add(fut)

        counted = time.monotonic()
        try:
            for _ in range(IN_FLIGHT * self.workers):
                if pending:
                    submit(pending.pop())
            for fut in done:
                chunk = inflight.pop(fut)
                try:
                    result = fut.result()
                except KilledWorker as err:
                    # This chunk was on a worker each time one died.  Split it to find the
                    # seed that kills workers.  The scheduler blames every task held by the
                    # dead worker, queued ones too, so a lone seed is a suspect, not yet a
                    # crash: it is tried again alone once the rest has run.
                    if len(chunk) > 1:
                        pending.extend([s] for s in reversed(chunk))
                    elif alone:
                        yield chunk, _crash(chunk[0], err)
                    else:
                        suspects.append(chunk)
                except Exception as err:
                    raise CampaignError(
                        f"seeds {chunk[0]}..{chunk[-1]} failed on the cluster: "
                        f"{type(err).__name__}: {err} (install the same smpkprobes on every "
                        f"worker)") from err
                else:
                    yield chunk, result
                fut.release()
                if time.monotonic() - counted > 5.0:    # workers come and go
                    counted = time.monotonic()
                    self.workers = max(1, len(self.client.scheduler_info()["workers"]))
                while pending and len(inflight) < IN_FLIGHT * self.workers:
                    submit(pending.pop())
                if not pending and not inflight and suspects:
                    # Nothing else is in flight, so a worker that dies now was running
                    # this seed and nothing else.
                    alone = True
                    submit(suspects.pop(0))
        finally:
            if inflight:
                self.client.cancel(list(inflight))

    def replays(self, name: str, argvs: list[list[str]], timeout: float) -> list[list[str]]:
        futs = [self.client.submit(replay_failures, name, argv, timeout, pure=False)
                for argv in argvs]
        return self.client.gather(futs)

    def worker_pids(self) -> dict[str, int]:
        return self.client.run(os.getpid)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _crash(seed: int, err: BaseException) -> ChunkResult:
    msg = f"the worker running it died each time it was tried ({type(err).__name__})"
    out = _stress.Outcome(seed, False, [msg], "worker died", "", 0.0, 0)
    return ChunkResult("(died)", code_digest(), [out])


def engine_for(jobs: int = 1, scheduler: str | None = None):
    if scheduler or jobs > 1:
        return DaskEngine(jobs, scheduler)
    return LocalEngine()


def first_failing(engine, name: str, argvs: list[list[str]], timeout: float, budget: int,
                  kind: str) -> tuple[int | None, str, int]:
    """Replay candidates in order, `engine.workers` at a time, until one fails with `kind`.
    Returns (its index or None, its failure, how many replays a one-at-a-time search would
    have spent), spending at most `budget` of them."""
    spent = 0
    while spent < len(argvs) and spent < budget:
        window = argvs[spent:spent + min(engine.workers, budget - spent)]
        for k, failures in enumerate(engine.replays(name, window, timeout)):
            hit = [f for f in failures if _stress.failure_kind(f) == kind]
            if hit:
                return spent + k, hit[0], spent + k + 1
        spent += len(window)
    return None, "", spent


# == the client ===========================================================================
def outcome_of(row: SeedRow, kinds: dict) -> _stress.Outcome:
    """A recorded seed as an Outcome (with the recording when it is its kind's first)."""
    schedule = coins = None
    k = kinds.get(row.kind)
    if k is not None and k["first_seed"] == row.seed and k["recording"]:
        sched, cns = json.loads(k["recording"])
        schedule, coins = [tuple(c) for c in sched], [tuple(c) for c in cns]
    return _stress.Outcome(row.seed, row.outcome == "pass",
                           [row.message] if row.message else [], row.kind, row.digest,
                           row.seconds, row.quanta, schedule, [], coins)


class Campaign:
    """A campaign of one scenario with one set of flags, in a store, run on an engine."""

    def __init__(self, name: str, extra: list[str], store: Store, engine,
                 new: bool = False, resume: bool = False, owns: tuple = ()):
        self.name, self.extra, self.store, self.engine = name, list(extra), store, engine
        self._owns = owns
        arch, policy = _arch_and_policy(name, extra)
        self.info: CampaignInfo
        self.info, self.resumed = store.open_campaign(name, self.extra, arch, policy,
                                                      new=new, resume=resume)
        self.recorded_before = 0
        self.on_chunk: Callable[[ChunkResult], None] | None = None   # for tests

    @classmethod
    def open(cls, name: str, extra: list[str], jobs: int = 1, scheduler: str | None = None,
             store=None, engine=None, new: bool = False, resume: bool = False) -> "Campaign":
        """A campaign on a store (a Store, a path, or None: in memory) and on an engine (given,
        or made from `jobs` and `scheduler`); what it makes here, it closes."""
        owns = []
        if not isinstance(store, Store):
            try:
                store = Store(store if store is not None else ":memory:")
            except OSError as err:
                raise StoreError(f"cannot open the store {store}: {err} "
                                 f"(give another file with --store)") from None
            owns.append(store)
        try:
            if engine is None:
                engine = engine_for(jobs, scheduler)
                owns.append(engine)
            return cls(name, extra, store, engine, new=new, resume=resume, owns=tuple(owns))
        except BaseException:
            for thing in reversed(owns):
                thing.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for thing in reversed(self._owns):
            thing.close()
        self._owns = ()

    @property
    def id(self) -> int:
        return self.info.id

    def run(self, seeds: range, timeout: float = _stress.DEFAULT_TIMEOUT, progress: bool = True,
            stop_at_first: bool = False, label: str | None = None) -> list[_stress.Outcome]:
        """Run the seeds the store does not have; return every seed's outcome, recorded
        before or now, in seed order (with `stop_at_first`, up to the lowest failing seed)."""
        store, cid = self.store, self.info.id
        kinds = {k["kind"]: k for k in store.kinds(cid)}
        outcomes = {r.seed: outcome_of(r, kinds) for r in store.seeds(cid, seeds.start,
                                                                        seeds.stop)}
        outcomes = {s: o for s, o in outcomes.items() if s in seeds}
        self.recorded_before = len(outcomes)
        todo = [s for s in seeds if s not in outcomes]
        if stop_at_first and _settled(seeds, outcomes) is not None:
            todo = []
        label = label or self.name
        if outcomes:
            label += f" ({len(outcomes)} recorded)"
        if todo:
            store.start_session(cid, self.engine.describe)
        bar = _stress._Progress(label, len(todo), enabled=progress)
        with bar:
            stream = self.engine.stream(self.name, self.extra,
                                        chunks_of(todo, self.engine.workers), timeout)
            try:
                for _, result in stream:
                    self._record(result)
                    for o in result.outcomes:
                        outcomes[o.seed] = o
                        bar.advance(o)
                    if self.on_chunk is not None:
                        self.on_chunk(result)
                    if stop_at_first and _settled(seeds, outcomes) is not None:
                        break
            finally:
                stream.close()
        ordered = [outcomes[s] for s in seeds if s in outcomes]
        if stop_at_first:
            first = _settled(seeds, outcomes)
            if first is not None:
                ordered = [o for o in ordered if o.seed <= first]
        return ordered

    def _record(self, result: ChunkResult) -> None:
        if result.code_digest != code_digest():
            raise CampaignError(f"worker {result.worker} runs other smpkprobes code (digest "
                                f"{result.code_digest}; this client has {code_digest()}) "
                                f"(install the same smpkprobes on every worker)")
        rows = []
        for o in result.outcomes:
            rec = json.dumps([o.schedule, o.coins]) if (not o.ok and o.schedule is not None) \
                else None
            outcome = "pass" if o.ok else {"timeout": "timeout",
                                           "worker died": "crash"}.get(o.kind, "fail")
            rows.append(SeedRow(o.seed, outcome, o.digest, o.kind,
                                o.failures[0] if o.failures else None, o.seconds, o.quanta,
                                _stress.replay_command(self.name,
                                                       _stress.seed_argv(self.extra, o.seed)),
                                result.worker, recording=rec))
        self.store.record(self.info.id, rows)

    def kinds(self) -> dict[str, dict]:
        return {k["kind"]: k for k in self.store.kinds(self.info.id)}

    def shrunk(self, kind: str, first_seed: int, command: str, note: str) -> None:
        self.store.set_shrunk(self.info.id, kind, first_seed, command, note)


def _settled(seeds: range, outcomes: dict) -> int | None:
    """The lowest failing seed, once every seed below it has an outcome; else None."""
    for s in seeds:
        o = outcomes.get(s)
        if o is None:
            return None
        if not o.ok:
            return s
    return None


def _arch_and_policy(name: str, extra: list[str]) -> tuple[str, str]:
    if _stress.load(name).scenario is not None:
        args = _stress.parse_args(name, _stress.seed_argv(extra, 0))
        return args.arch, args.schedule

    def flag(f, default):
        return extra[extra.index(f) + 1] if f in extra[:-1] else default
    return flag("--arch", "x86_64"), flag("--schedule", "random")


# == the command line =====================================================================
def default_store() -> str:
    """--store's default: $SMPKPROBES_STORE, else .smpkprobes/campaigns.sqlite."""
    from ._store import DEFAULT_STORE
    return os.environ.get("SMPKPROBES_STORE") or str(DEFAULT_STORE)


def add_engine_options(p, resume: bool = True) -> None:
    """--scheduler and --store (and --resume, --new) on a subcommand."""
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT", default=None,
                   help="run on the Dask cluster of this scheduler (default: an embedded "
                        "LocalCluster of --jobs workers, or this process with --jobs 1)")
    p.add_argument("--store", metavar="FILE", default=None,
                   help="the campaign store (default $SMPKPROBES_STORE or "
                        ".smpkprobes/campaigns.sqlite)")
    if resume:
        p.add_argument("--resume", action="store_true",
                       help="resume the recorded campaign of this scenario and flags (the "
                            "same command again does that too); fail if there is none")
        p.add_argument("--new", action="store_true",
                       help="start a new campaign even if one is recorded (needed when the "
                            "code changed since)")


def campaign_flags(c) -> None:
    """The flags of `smpkprobes campaign`."""
    c.add_argument("action", choices=["list", "show", "report"])
    c.add_argument("id", nargs="?", type=int)
    c.add_argument("--store", metavar="FILE", default=None,
                   help="the campaign store (default $SMPKPROBES_STORE or "
                        ".smpkprobes/campaigns.sqlite)")
    c.add_argument("--html", metavar="FILE", default=None,
                   help="where `report` writes its page (default smpkprobes-campaign-ID.html)")


def campaign_main(a) -> int:
    """`smpkprobes campaign ...`; a CampaignError or StoreError for the caller to print."""
    from . import _report
    path = a.store or default_store()
    if not os.path.exists(path):
        raise StoreError(f"no campaign store at {path} (run `smpkprobes stress` first, or "
                         f"give the file with --store)")
    if a.action != "list" and a.id is None:
        raise CampaignError(f"`campaign {a.action}` needs a campaign ID (see "
                            f"`smpkprobes campaign list`)")
    store = Store(path)
    try:
        if a.action == "list":
            return _report.list_campaigns(store)
        if a.action == "show":
            return _report.show(store, a.id)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CampaignError("the report's plots need matplotlib (pip install "
                                "'smpkprobes[cluster]')") from None
        return _report.report(store, a.id, a.html)
    finally:
        store.close()


def engine_options(a) -> dict:
    """The stress/selftest keyword arguments from parsed options."""
    if getattr(a, "resume", False) and getattr(a, "new", False):
        raise CampaignError("--resume and --new contradict each other (give one)")
    opts = {"scheduler": a.scheduler, "store": a.store or default_store()}
    if hasattr(a, "resume"):
        opts.update(resume=a.resume, new=a.new)
    if a.scheduler and not a.scheduler.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        raise CampaignError(f"--scheduler {a.scheduler} is not a scheduler address (give "
                            f"tcp://HOST:PORT, as `dask scheduler` prints it)")
    return opts

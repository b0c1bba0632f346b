"""`smpkprobes bench campaign`: the campaign engine against the ProcessPool it replaced.

Three figures, each with its target:
  * seeds per second of a campaign on the embedded LocalCluster (start-up, store and all)
    against the ProcessPoolExecutor path stress used before, same seeds and jobs (>= 0.9x);
  * scaling from 1 to 2 Dask workers on this machine, started clusters, same seeds
    (efficiency = rate(2) / (2 x rate(1)), >= 0.8);
  * the store's share of the campaign's wall time (< 2%).
Wall-clock figures of the host, so noisy on a shared machine: each is the best of `repeat`.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import tempfile
import time
from pathlib import Path

from . import _campaign, _stress
from ._store import Store

SCENARIO, EXTRA = "fault_injection", []


def _pool_worker(job):
    name, argv, timeout = job
    out = _stress.run_once(name, argv, timeout)
    out.lines = []
    return out


def process_pool(name: str, extra: list[str], seeds: range, jobs: int) -> float:
    """Seeds per second of the ProcessPoolExecutor path that stress used before campaigns
    (spawned processes, one task per seed, results kept in memory)."""
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_pool_worker, (name, _stress.seed_argv(extra, s), 120.0))
                   for s in seeds]
        outs = [f.result() for f in cf.as_completed(futures)]
    assert len(outs) == len(seeds)
    return len(seeds) / (time.perf_counter() - t0)


def embedded(name: str, extra: list[str], seeds: range, jobs: int, db: Path) -> tuple[float,
                                                                                       float]:
    """(seeds per second, the store's share of the time) of a fresh campaign on an embedded
    LocalCluster of `jobs` workers, start-up and teardown included."""
    t0 = time.perf_counter()
    store = Store(db)
    with _campaign.Campaign.open(name, extra, jobs=jobs, store=store, new=True) as camp:
        outs = camp.run(seeds, progress=False)
    wall = time.perf_counter() - t0
    share = store.seconds / wall
    store.close()
    assert len(outs) == len(seeds)
    return len(seeds) / wall, share


def steady_rate(name: str, extra: list[str], seeds: range, workers: int, db: Path) -> float:
    """Seeds per second of a started LocalCluster of `workers` (warmed by one chunk each)."""
    engine = _campaign.DaskEngine(workers)
    try:
        store = Store(db)
        with _campaign.Campaign.open(name, extra, store=store, engine=engine, new=True) as camp:
            camp.run(range(seeds.start - workers, seeds.start), progress=False)   # warm-up
            t0 = time.perf_counter()
            outs = camp.run(seeds, progress=False)
            dt = time.perf_counter() - t0
        store.close()
    finally:
        engine.close()
    assert len(outs) == len(seeds)
    return len(seeds) / dt


def bench_campaign(seeds: int = 120, jobs: int = 2, repeat: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "bench.sqlite"
        span = range(1000, 1000 + seeds)
        # Interleaved, so that a change in the machine's load falls on both sides.
        pools, runs, ones, twos = [], [], [], []
        for _ in range(repeat):
            pools.append(process_pool(SCENARIO, EXTRA, span, jobs))
            runs.append(embedded(SCENARIO, EXTRA, span, jobs, db))
            ones.append(steady_rate(SCENARIO, EXTRA, span, 1, db))
            twos.append(steady_rate(SCENARIO, EXTRA, span, 2, db))
        pool, dask_rate, one, two = max(pools), max(r[0] for r in runs), max(ones), max(twos)
        share = min(r[1] for r in runs)
    return {"seeds": seeds, "jobs": jobs, "pool": pool, "dask": dask_rate,
            "ratio": dask_rate / pool, "one": one, "two": two,
            "efficiency": two / (2 * one), "store_share": share}


def main(quick: bool = False) -> int:
    r = bench_campaign(seeds=40 if quick else 120, repeat=1 if quick else 3)
    print(f"bench campaign: {SCENARIO}, {r['seeds']} seeds, {r['jobs']} jobs, best of runs")
    print(f"  {'ProcessPool (before campaigns), start-up included':<52} {r['pool']:>7.1f} "
          f"seeds/s")
    print(f"  {'embedded LocalCluster + store, start-up included':<52} {r['dask']:>7.1f} "
          f"seeds/s  {r['ratio']:.2f}x   (target >= 0.9x)")
    print(f"  {'LocalCluster, 1 worker, started':<52} {r['one']:>7.1f} seeds/s")
    print(f"  {'LocalCluster, 2 workers, started':<52} {r['two']:>7.1f} seeds/s  "
          f"efficiency {r['efficiency']:.2f}   (target >= 0.8)")
    print(f"  {'store: share of the campaign time':<52} {r['store_share']:>7.2%}"
          f"           (target < 2%)")
    return 0

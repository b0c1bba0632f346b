"""Shrinking a failing run's recording to a few overrides of the simplest schedule (delta
debugging), with its replays on a campaign engine; see `_stress` for the whole story."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..machine import _conductor
from . import _stress

MIN_SECONDS = 90.0        # the least wall time a shrink may take (see `shrink`)


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
           max_seconds: float | None = None, timeout: float = 120.0, log=None,
           engine=None) -> Shrunk:
    """Delta-debug the recording (`schedule` and `coins`) of a run of `name` with `extra`
    and `seed` that failed with `kind`, down to a few overrides that still fail that way.

    Each choice and each non-zero coin is one override of the simplest run (round-robin,
    coins 0); taking one out does not move any other, which is what lets delta debugging
    converge.

    The replays run on `engine` (see `_campaign`; default: this process).  Where the search
    tries candidates in order until one fails, they go out as many at once as the engine has
    workers, and the first that fails is taken: the same result, and the same count of
    replays against `max_runs`, as trying them one at a time.  Candidates are built a window
    at a time: those of a recording of 10^4 overrides would not fit in memory at once.

    `max_runs` replays bound the search; `max_seconds` of wall time too, by default enough
    for `max_runs` replays as long as the first (the whole recording) took, and at least
    `MIN_SECONDS`.  A fixed 90 s used to end the search of a scenario whose replays take
    seconds after 20-odd replays, all spent on the prefix."""
    from . import _campaign
    engine = engine or _campaign.LocalEngine()
    policy = _stress.parse_args(name, _stress.seed_argv(extra, seed)).schedule
    base = _stress.seed_argv(extra, seed)
    t_start = time.perf_counter()
    t_end = t_start + (max_seconds if max_seconds is not None else MIN_SECONDS)
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

    def argv_of(its) -> list[str]:
        return [*base, "--schedule", policy, "--replay",
                _conductor.format_recording(recording(its))]

    width = max(1, getattr(engine, "workers", 1))

    def first_failing(candidates) -> int | None:
        """The index of the first candidate (an iterable of override lists, consumed a
        window of `width` at a time) that fails with `kind`, or None."""
        it = iter(candidates)
        done = 0
        while runs[0] < max_runs and time.perf_counter() <= t_end:
            window = [its for _, its in zip(range(width), it)]
            if not window:
                break
            i, failure, spent = _campaign.first_failing(
                engine, name, [argv_of(its) for its in window], timeout,
                max_runs - runs[0], kind)
            runs[0] += spent
            if i is not None:
                last_failure[0] = failure
                return done + i
            done += len(window)
        return None

    def fails(its) -> bool:
        return first_failing([its]) == 0

    best = items
    if not fails(best):
        return Shrunk(recording(best), len(items), runs[0], False, "")
    if max_seconds is None:
        t_end = max(t_end, t_start + max_runs * (time.perf_counter() - t_start) / width)
    failure = last_failure[0]
    # 1. the shortest failing prefix, by step: prefixes of 0, 1, 2, 4... steps first (a
    # failure need not be monotone in the prefix), then a binary search below the first
    # that fails.  Every prefix kept was replayed.
    n = len(schedule)
    lo, hi = 0, n
    lengths, length = [], 0
    while length < n:
        lengths.append(length)
        length = min(n, max(1, 2 * length))
    k = first_failing([it for it in best if it[0] < ln] for ln in lengths)
    if k is not None:
        lo, hi, failure = (lengths[k - 1] + 1 if k else 0), lengths[k], last_failure[0]
    elif lengths:
        lo = lengths[-1] + 1
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
            cur = best
            k = first_failing(cur[:j] + cur[j + size:] for j in range(i, len(cur), size))
            if k is None:
                break
            i += k * size
            best, failure = cur[:i] + cur[i + size:], last_failure[0]
        if size == 1:
            break
        size //= 2
    if log:
        log(f"shrunk: {len(best)} overrides after {runs[0]} replays")
    return Shrunk(recording(best), len(items), runs[0], True, failure)

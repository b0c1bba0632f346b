"""The trace's digest fold: the bytes an event contributes to the run's digest.

The digest (`SMPMachine.trace_digest`) is blake2b-128 over each event's repr, in order, and
the ring folds the events it drops into it (`_compact_trace`).  Folding is a real per-event
cost of every run: an event is written once by the hit path and, once the ring is full,
repr'd once here - on a loaded host about a microsecond per event in Python, as much as a
whole jump-optimized hit.  So the fold has a C twin, `fold()` in _tracefold_native.c, an
optional extension built as the block budget's is (no compiler: a warning, and this module's
Python twin runs).  Both give exactly `"".join(map(repr, events)).encode()`: the digests
recorded before the C fold existed (tests/golden) are unchanged, and
tests/test_tracefold.py compares the two on edge cases.
"""

from __future__ import annotations

try:
    from ._tracefold_native import fold as _native_fold
except ImportError:         # not built here (no C compiler or no Python headers at install)
    _native_fold = None


def fold_twin(events) -> bytes:
    """What `fold` returns, in Python: every event's repr, concatenated, UTF-8."""
    return "".join(map(repr, events)).encode()


fold = _native_fold if _native_fold is not None else fold_twin

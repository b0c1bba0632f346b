"""Perfetto slices of handlers and steps are visible: at least MIN_SLICE_NS wide, still
properly nested, and never far from their virtual time."""

import trio

from smpkprobes import Kprobe, Machine
from smpkprobes.tools import _trace_export


async def test_handler_and_step_slices_have_a_minimum_width():
    """Every X slice is at least MIN_SLICE_NS wide (pre/post handlers and boosted steps take
    no virtual time), slices nest, and none moves more than a few minimum widths."""
    async with Machine(cpus=2, seed=1) as m:
        # trapped probes: an optimized one's hit is an "opt" slice of its own
        await m.sysctl.write("debug/kprobes-optimization", "0")
        stepped = Kprobe(symbol_name="do_fork", pre_handler=lambda p, r: 0,
                         post_handler=lambda p, r, f: None)
        boosted = Kprobe(symbol_name="fork_loop", pre_handler=lambda p, r: 0)
        await m.kprobes.register_kprobe(stepped)
        await m.kprobes.register_kprobe(boosted)
        async with trio.open_nursery() as n:
            for cpu in range(2):
                n.start_soon(m.call, "fork_loop", 20)
    slices = _trace_export._Timeline(m).slices
    # do_fork: 40 pre and 40 post handlers; fork_loop: 2 pre handlers; all at one instant
    assert sum(s.end == s.start for s in slices if s.cat == "handler") == 82
    events = [e for e in _trace_export.perfetto_events(m) if e["ph"] == "X"]
    width = _trace_export.MIN_SLICE_NS / 1000
    assert min(e["dur"] for e in events) == width
    names = {e["name"] for e in events if e["dur"] == width}
    assert {"pre_handler", "post_handler", "single-step (boosted)"} <= names
    for tid in (0, 1):
        open_ = []
        for e in (e for e in events if e["tid"] == tid):
            a, b = e["ts"], e["ts"] + e["dur"]
            while open_ and open_[-1] <= a + 1e-9:
                open_.pop()
            assert not open_ or b <= open_[-1] + 1e-9, (e, open_)
            open_.append(b)
    virtual = {(s.track, s.name, s.seq): s.start for s in slices}
    shifts = sorted(e["ts"] * 1000 for e in events)          # exported starts exist ...
    assert len(shifts) == len(virtual)
    starts = sorted(s.start for s in slices)
    assert all(0 <= x - v <= 3 * _trace_export.MIN_SLICE_NS + 1e-6
               for x, v in zip(shifts, starts))

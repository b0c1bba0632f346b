"""Seeing what happened: the machine's event trace as ftrace text, as Perfetto JSON, as a picture.

The events are listed in the order the simulation executed them (`_timeline` says what
they are and how they are placed in virtual time).  The CPUs' clocks only agree to within a
quantum, so a total order by timestamp would show effects before causes (a hit before its
probe's registration); `ftrace_text(order="time")` gives that merge anyway, like the
kernel's per-CPU buffers.

Three renderings:
  * `export_ftrace`   - one line per event, like the kernel's `trace` file, merged by time;
  * `export_perfetto` - Chrome trace-event JSON: one track per CPU with nested duration
    slices (task running > probe hit > pre_handler / single-step / post_handler), instants
    for misses, stray traps, IPIs and printk, async slices for grace periods and text syncs;
  * `plot_timeline`   - the same timeline drawn with matplotlib (`--plot`, in `_plot`).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterable

from .._ftrace import format_ts as format_ts
from .._ftrace import ftrace_header as ftrace_header
from .._ftrace import ftrace_line as ftrace_line
from ._plot import PlotUnavailable as PlotUnavailable
from ._plot import plot_curves as plot_curves
from ._plot import plot_timeline as plot_timeline
from ._plot import require_matplotlib as require_matplotlib
from ._timeline import EVENTS as EVENTS
from ._timeline import Slice, _Timeline, _us
from ._timeline import expand as expand
from ._timeline import fields_of as fields_of


@contextlib.contextmanager
def _open_text(out, mode: str = "w"):
    if isinstance(out, (str, os.PathLike)):
        with open(out, mode, encoding="utf-8", newline="\n") as f:
            yield f
    else:
        yield out


# == ftrace text ==========================================================================
def _ftrace_body(tl: _Timeline, e: dict) -> tuple[str, str]:
    kind = e["kind"]
    sym = tl.sym
    if kind == "q":
        return "sched_quantum", f"len={e['quantum']}"
    if kind == "run":
        comm, pid = tl.task(e["pid"])
        return "sched_switch", f"prev_comm=<idle> prev_pid=0 ==> next_comm={comm} next_pid={pid}"
    if kind == "new":
        args = ", ".join(str(a) for a in e["args"])
        where = "any" if e["affinity"] is None else e["affinity"]
        func = sym(e["func"]).removesuffix("+0x0")
        return "task_newtask", (f"pid={e['pid']} comm={e['comm']} func={func} "
                                f"args=({args}) cpu={where}")
    if kind == "sleep":
        return "sched_sleep", f"until={format_ts(e['wake_at']).strip()}"
    if kind == "wake":
        comm, pid = tl.task(e["pid"])
        return "sched_wakeup", f"comm={comm} pid={pid}"
    if kind == "preempt":
        comm, pid = tl.task(e["pid"])
        return "sched_preempt", f"comm={comm} pid={pid}"
    if kind == "exit":
        comm, pid = tl.task(e["pid"])
        return "sched_process_exit", f"comm={comm} pid={pid} ret={e['result']}"
    if kind == "printk":
        return "console", e["line"]
    if kind == "poke":
        return "text_poke", f"sync={e['sync']} " + " ".join(
            f"({sym(a)})={data}" for a, data in e["patches"])
    if kind == "synced":
        return "text_sync_done", f"sync={e['sync']}"
    if kind == "ipi":
        return "ipi_sync_core", ""
    if kind == "gp_begin":
        return "grace_period_start", f"gp={e['gp']}"
    if kind == "gp":
        return "grace_period_end", f"gp={e['gp']} completed={e['completed']}"
    if kind in ("register", "unregister"):
        where = sym(e["addr"]) if e["addr"] is not None else "?"
        return f"kprobe_{kind}", f"type={e['type']} ({where})"
    if kind == "opt_gp_begin":
        return "optimizer_wait_start", f"optimize={e['ops']} free={e['frees']}"
    if kind == "opt_gp_end":
        return "optimizer_wait_end", ""
    if kind == "ss":
        return "kprobe_ss", f"({sym(e['addr'])}) how={e['how']}"
    if kind == "bp_hit":
        return "hw_breakpoint", (f"({sym(e['access_addr'])}) access={e['access']} "
                                 f"how={e['how']}")
    if kind in ("bp_register", "bp_unregister"):
        return f"hw_breakpoint_{kind[3:]}", (f"({sym(e['addr'])})/{e['len']}:{e['type']} "
                                             f"{e['target']}")
    names = {"hit": "kprobe_hit", "ssdone": "kprobe_ss_done", "done": "kprobe_done",
             "miss": "kprobe_miss", "stray": "kprobe_stray", "rp_miss": "kretprobe_miss",
             "ret": "kretprobe_return", "opt": "kprobe_optimized_hit",
             "opt_queue": "optimize_kprobe", "opt_patch": "optprobe_jump_written",
             "unopt": "unoptimize_kprobe"}
    if kind in names:
        return names[kind], f"({sym(e['addr'])})"
    return kind, " ".join(f"{k}={v!r}" for k, v in e.items() if k != "kind")


def ftrace_text(machine, kinds: Iterable[str] | None = None, order: str = "trace") -> str:
    """The event trace as ftrace-style text: one line per event (of `kinds`, default all), in
    the order the simulation executed them (`order="trace"`) or merged by timestamp
    (`order="time"`, like the kernel's trace file)."""
    if order not in ("trace", "time"):
        raise ValueError(f"order must be 'trace' or 'time', not {order!r}")
    tl = _Timeline(machine)
    wanted = None if kinds is None else set(kinds)
    lines = []
    key = (lambda p: p[1]) if order == "trace" else (lambda p: (p[0], p[1]))
    for t, _i, cpu, comm, pid, e in sorted(tl.placed, key=key):
        if wanted is not None and e["kind"] not in wanted:
            continue
        event, body = _ftrace_body(tl, e)
        lines.append(ftrace_line(comm, pid, cpu, t, event, body))
    extra = [f"smpkprobes: {machine.arch}, {machine.ncpus} CPUs, seed {machine.seed}"
             f"{', preempt' if machine.preempt else ''}; trace {machine.trace_digest()}",
             "virtual clock: 1 ns per guest instruction; " +
             ("events in the order the simulation ran them" if order == "trace"
              else "events merged by timestamp")]
    return ftrace_header(len(lines), machine.ncpus, "smpkprobes", extra) + \
        "".join(line + "\n" for line in lines)


def export_ftrace(machine, out, kinds: Iterable[str] | None = None, order: str = "trace") -> None:
    """Write `ftrace_text(machine)` to `out`, a path or a text file."""
    with _open_text(out) as f:
        f.write(ftrace_text(machine, kinds, order))


# == Chrome / Perfetto trace-event JSON =====================================================
PID = 1                        # the machine is one "process"; each CPU is a "thread"


# Handlers run on the host between two guest instructions, and a boosted step is one jump:
# in virtual time (one ns per instruction, a fixed cost per trap) they take no time, and a
# zero-length slice is invisible in Perfetto.  The export draws every slice at least this
# wide; a slice that starts at the same instant as a widened one (the step after its
# pre_handler) starts that much later, and its parent stretches to hold it.  Traps on a CPU
# are at least TRAP_COST_NS (50 ns) apart, so the widening never piles up across hits.
MIN_SLICE_NS = 10


def _widen(slices: list[Slice]) -> dict[int, tuple[int, int]]:
    """Display (start, end) for the slices of one track, by `id()`: each at least
    MIN_SLICE_NS wide, children inside their parent, siblings one after the other."""
    roots: list[tuple[Slice, list]] = []
    stack: list[tuple[Slice, list]] = []
    for sl in sorted(slices, key=lambda x: (x.start, x.depth, x.seq)):
        del stack[sl.depth:]
        node = (sl, [])
        (stack[-1][1] if stack else roots).append(node)
        stack.append(node)
    placed: dict[int, tuple[int, int]] = {}

    def lay(nodes, cursor: int) -> int:
        for sl, children in nodes:
            start = max(sl.start, cursor)
            end = max(sl.end, lay(children, start), start + MIN_SLICE_NS)
            placed[id(sl)] = (start, end)
            cursor = end
        return cursor

    lay(roots, 0)
    return placed


def perfetto_events(machine) -> list[dict]:
    """The trace as a list of trace-event dicts (ts and dur in µs).  Slices are at least
    MIN_SLICE_NS wide (see above); instants and async spans are at their virtual times."""
    tl = _Timeline(machine)
    host = machine.ncpus
    out: list[dict] = [
        {"name": "process_name", "ph": "M", "pid": PID, "tid": 0,
         "args": {"name": f"smpkprobes {machine.arch} ({machine.ncpus} CPUs, seed "
                          f"{machine.seed})"}},
    ]
    for tid, name in [*((c, f"CPU {c}") for c in range(machine.ncpus)), (host, "kprobes (host)")]:
        out.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid,
                    "args": {"name": name}})
        out.append({"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": tid,
                    "args": {"sort_index": tid}})
    body: list[tuple[tuple, dict]] = []
    placed: dict[int, tuple[int, int]] = {}
    for track in sorted({s.track for s in tl.slices}):
        placed.update(_widen([s for s in tl.slices if s.track == track]))
    for s in tl.slices:
        tid = host if s.track < 0 else s.track
        start, end = placed[id(s)]
        ev = {"name": s.name, "cat": s.cat, "ph": "X", "ts": _us(start),
              "dur": _us(end - start), "pid": PID, "tid": tid}
        if s.args:
            ev["args"] = s.args
        body.append(((start, s.depth, s.seq), ev))
    for n in tl.instants:
        tid = host if n.track < 0 else n.track
        ev = {"name": n.name, "cat": n.cat, "ph": "i", "s": "t", "ts": _us(n.t), "pid": PID,
              "tid": tid}
        if n.args:
            ev["args"] = n.args
        body.append(((n.t, 99, 0), ev))
    for sp in tl.spans:
        common = {"name": sp.name, "cat": sp.cat, "id": sp.id, "pid": PID, "tid": host}
        b = {**common, "ph": "b", "ts": _us(sp.start)}
        if sp.args:
            b["args"] = sp.args
        body.append(((sp.start, -1, sp.id), b))
        body.append(((sp.end, 100, sp.id), {**common, "ph": "e", "ts": _us(sp.end)}))
    body.sort(key=lambda kv: kv[0])
    out.extend(ev for _, ev in body)
    return out


def perfetto_json(machine) -> dict:
    return {"traceEvents": perfetto_events(machine), "displayTimeUnit": "ns",
            "otherData": {"arch": machine.arch, "cpus": machine.ncpus, "seed": machine.seed,
                          "preempt": machine.preempt, "trace_digest": machine.trace_digest(),
                          "clock": "virtual: 1 ns per guest instruction"}}


def export_perfetto(machine, out) -> None:
    """Write the trace-event JSON to `out` (a path or a text file); open it in
    ui.perfetto.dev or chrome://tracing."""
    with _open_text(out) as f:
        json.dump(perfetto_json(machine), f, separators=(",", ":"))
        f.write("\n")


# == the harness side: exports after a run ===================================================
def export_all(machine, *, trace=None, perfetto=None, plot=None, curves=None, title=None,
               log=None) -> None:
    """What `--trace FILE --perfetto FILE --plot FILE` do after a run.  `curves`, when a
    scenario gives one, is a `plot_curves()` specification drawn instead of the timeline."""
    if trace:
        export_ftrace(machine, trace)
        if log:
            log(f"ftrace-style trace written to {trace}")
    if perfetto:
        export_perfetto(machine, perfetto)
        if log:
            log(f"Perfetto trace written to {perfetto} (open it in ui.perfetto.dev)")
    if plot:
        if curves is not None:
            plot_curves(out=plot, **curves)
        else:
            plot_timeline(machine, plot, title=title)
        if log:
            log(f"plot written to {plot}")

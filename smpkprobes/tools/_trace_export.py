"""Seeing what happened: the machine's event trace as ftrace text, as Perfetto JSON, as a picture.

The event trace (`m.trace`) is a list of tuples, one per event, appended where the event
happens.  `EVENTS` below names their fields.  Every event carries a virtual timestamp `t` in
ns: a CPU's events are stamped with that CPU's clock (the start of the quantum plus the fixed
cost of each trap taken in it), host events (registration, text_poke, grace periods) with the
machine's time, the start of the latest quantum.

Within one quantum the clock is only known at its start: an event inside it is stamped with
the quantum's start plus the fixed cost of each trap or hypercall taken so far (the time a
handler reads with `regs.cpu.now_ns()`), so its place inside the quantum is approximate.  A
CPU's stamps never run backwards; the exporters keep them monotonic regardless.

The events are listed in the order the simulation executed them.  The CPUs' clocks only
agree to within a quantum, so a total order by timestamp would show effects before causes
(a hit before its probe's registration); `ftrace_text(order="time")` gives that merge anyway,
like the kernel's per-CPU buffers.

Three renderings:
  * `export_ftrace`   - one line per event, like the kernel's `trace` file, merged by time;
  * `export_perfetto` - Chrome trace-event JSON: one track per CPU with nested duration
    slices (task running > probe hit > pre_handler / single-step / post_handler), instants
    for misses, stray traps, IPIs and printk, async slices for grace periods and text syncs;
  * `plot_timeline`   - the same timeline drawn with matplotlib (`--plot`).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Iterable

from ..machine import _memory as mem

# The fields of each event kind, after the kind itself.  `t` is always the last field.
EVENTS: dict[str, tuple[str, ...]] = {
    # tasks and the conductor
    "new": ("pid", "comm", "func", "args", "affinity", "t"),
    "run": ("cpu", "pid", "t"),
    "q": ("cpu", "pid", "quantum", "t"),
    "sleep": ("cpu", "pid", "wake_at", "t"),
    "wake": ("pid", "t"),
    "exit": ("cpu", "pid", "result", "t"),
    "printk": ("cpu", "line", "t"),
    # text patching and grace periods (host side, except the per-CPU IPI)
    "poke": ("patches", "sync", "t"),
    "synced": ("sync", "t"),
    "ipi": ("cpu", "t"),
    "gp_begin": ("gp", "t"),
    "gp": ("completed", "gp", "t"),
    # the probe core
    "register": ("type", "addr", "t"),
    "unregister": ("type", "addr", "t"),
    "hit": ("cpu", "addr", "t"),            # trap taken; pre_handlers start
    "ss": ("cpu", "addr", "t", "how"),      # pre_handlers done; step: slot, boost, simulate
    # A boosted hit whose pre_handlers traced nothing: ("hit", cpu, addr, t) followed by
    # ("ss", cpu, addr, t_ss, "boost"), in one event (a hit is mostly the memory its
    # events take).  `expand` gives the two back.
    "boost": ("cpu", "addr", "t", "t_ss"),
    "ssdone": ("cpu", "addr", "t"),         # a reentered probe's step trapped back
    "done": ("cpu", "addr", "t"),           # step and post_handlers over, the CPU resumes
    "miss": ("cpu", "addr", "t"),           # reentry: nmissed++, stepped without handlers
    "stray": ("cpu", "addr", "t"),          # the probe was removed under this trap
    "rp_miss": ("cpu", "addr", "t"),        # kretprobe pool empty
    "ret": ("cpu", "addr", "t"),            # return through the kretprobe trampoline
    # jump optimization (kprobes/_optprobe.py)
    "opt": ("cpu", "addr", "t"),            # an optimized hit: the detour's hook, no trap
    "opt_queue": ("addr", "t"),             # a probe queued for the optimizer
    "opt_gp_begin": ("ops", "frees", "t"),  # the optimizer waits (grace period, RCU tasks)
    "opt_gp_end": ("t",),
    "opt_patch": ("addr", "t"),             # a jump written (int3 first)
    "unopt": ("addr", "t"),                 # the region restored, the int3 kept
}

TRAMPOLINE = "kretprobe_trampoline"


def expand(trace: Iterable[tuple]) -> Iterable[tuple]:
    """The trace with each "boost" event replaced by the "hit" and "ss" it stands for."""
    for ev in trace:
        if ev[0] == "boost":
            _, cpu, addr, t, t_ss = ev
            yield ("hit", cpu, addr, t)
            yield ("ss", cpu, addr, t_ss, "boost")
        else:
            yield ev


def fields_of(ev: tuple) -> dict:
    """The event as a dict (`kind` plus its named fields); unknown kinds keep positions."""
    names = EVENTS.get(ev[0])
    if names is None or len(names) != len(ev) - 1:
        return {"kind": ev[0], **{f"f{i}": v for i, v in enumerate(ev[1:])}}
    return {"kind": ev[0], **dict(zip(names, ev[1:]))}


def format_ts(ns: int) -> str:
    """ftrace's `%5lu.%06lu`, but with ns: the virtual clock counts one ns per instruction."""
    return f"{ns // 1_000_000_000:5d}.{ns % 1_000_000_000:09d}"


def ftrace_line(comm: str, pid: int, cpu: int | None, ns: int, event: str, body: str) -> str:
    """`<comm>-<pid> [cpu] timestamp: event: body`, padded like the kernel's trace file."""
    where = "---" if cpu is None else f"{cpu:03d}"
    return f"{comm[:16]:>16}-{pid:<7} [{where}] {format_ts(ns)}: {event}: {body}".rstrip()


def ftrace_header(nentries: int, ncpus: int, tracer: str = "nop", extra: Iterable[str] = ()) -> str:
    lines = [f"# tracer: {tracer}", "#", *(f"# {e}" for e in extra),
             f"# entries-in-buffer/entries-written: {nentries}/{nentries}   #P:{ncpus}", "#",
             "#           TASK-PID     CPU#     TIMESTAMP  FUNCTION",
             "#              | |         |         |         |"]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _open_text(out, mode: str = "w"):
    if isinstance(out, (str, os.PathLike)):
        with open(out, mode, encoding="utf-8", newline="\n") as f:
            yield f
    else:
        yield out


# == the timeline model ==================================================================
@dataclass
class Slice:
    track: int                 # CPU id, or -1 for the host
    name: str
    cat: str
    start: int
    end: int
    depth: int
    args: dict = field(default_factory=dict)
    seq: int = 0               # opening order: siblings at one timestamp keep their order


@dataclass
class Instant:
    track: int
    name: str
    cat: str
    t: int
    args: dict = field(default_factory=dict)


@dataclass
class Span:
    """A machine-wide interval that may overlap others of its kind (an async slice)."""

    name: str
    cat: str
    id: int
    start: int
    end: int
    args: dict = field(default_factory=dict)


@dataclass
class _Frame:
    kind: str                  # "task", "hit", "reenter", "ret", or a sub-slice
    name: str
    cat: str
    start: int
    args: dict
    seq: int


class _Timeline:
    """Replays the event trace into placed times, slices, instants and spans."""

    def __init__(self, machine):
        self.m = machine
        self.ncpus = machine.ncpus
        self.slices: list[Slice] = []
        self.instants: list[Instant] = []
        self.spans: list[Span] = []
        # (placed time, trace index, cpu or None, comm, pid, event dict) for ftrace.
        self.placed: list[tuple[int, int, int | None, str, int, dict]] = []
        self.comm: dict[int, str] = {}
        self._stack: list[list[_Frame]] = [[] for _ in range(self.ncpus)]
        self._last = [0] * self.ncpus
        self._qend = [0] * self.ncpus
        self._running: list[int] = [0] * self.ncpus          # pid on each CPU, 0 idle
        self._on_cpu: dict[int, int] = {}                     # pid -> cpu
        self._open_sync: dict[int, tuple[int, dict]] = {}
        self._open_gp: dict[int, int] = {}
        self._opt_gp: list[tuple[int, dict]] = []     # the optimizer's waits, oldest first
        self._opt_gps = 0
        self._host_t = 0
        self._seq = 0
        self._syms: dict[int, str] = {}
        self.end = 0
        for i, ev in enumerate(expand(machine.trace)):
            self._event(i, ev)
        for cpu in range(self.ncpus):
            self._close_all(cpu, max(self._last[cpu], self._qend[cpu]))
        for sync, (t, args) in sorted(self._open_sync.items()):
            self.spans.append(Span(f"text_poke #{sync}", "text_sync", sync, t, t, args))
        for gp, t in sorted(self._open_gp.items()):
            self.spans.append(Span(f"grace period #{gp}", "grace_period", gp, t, t))
        self.end = max([self.end, *self._last, self._host_t,
                        *(s.end for s in self.slices), *(s.end for s in self.spans)])

    # -- names ------------------------------------------------------------------------
    def sym(self, addr: int) -> str:
        """`name+0xoff [module]`, as kallsyms knows it now (a module unloaded since the run
        shows as a bare address)."""
        text = self._syms.get(addr)
        if text is None:
            s = self.m.symbolize(addr)
            if s is None:
                text = (f"insn_slot+{addr - mem.SLOTS.start:#x}" if addr in mem.SLOTS
                        else f"{addr:#x}")
            else:
                name, off, module = s
                text = f"{name}+{off:#x}" + (f" [{module}]" if module else "")
            self._syms[addr] = text
        return text

    def task(self, pid: int) -> tuple[str, int]:
        if not pid:
            return "<idle>", 0
        return self.comm.get(pid, "?"), pid

    # -- placing ----------------------------------------------------------------------
    def _place(self, cpu: int, t: int) -> int:
        t = max(t, self._last[cpu])
        self._last[cpu] = t
        return t

    def _emit(self, i: int, cpu: int | None, t: int, e: dict) -> None:
        """Queue the ftrace line of an event, as seen from the task running on `cpu` (or
        from the host)."""
        comm, pid = self.task(self._running[cpu]) if cpu is not None else ("<host>", 0)
        self.placed.append((t, i, cpu, comm, pid, e))

    # -- slices on a CPU track ------------------------------------------------------------
    def _push(self, cpu: int, kind: str, name: str, cat: str, t: int, **args) -> None:
        self._seq += 1
        self._stack[cpu].append(_Frame(kind, name, cat, t, args, self._seq))

    def _pop(self, cpu: int, t: int) -> _Frame:
        stack = self._stack[cpu]
        f = stack.pop()
        self.slices.append(Slice(cpu, f.name, f.cat, f.start, t, len(stack), f.args, f.seq))
        return f

    def _pop_to(self, cpu: int, t: int, kinds: tuple[str, ...]) -> None:
        """Close frames down to and including the innermost one of `kinds` (if any)."""
        stack = self._stack[cpu]
        if not any(f.kind in kinds for f in stack):
            return
        while stack:
            if self._pop(cpu, t).kind in kinds:
                return

    def _top(self, cpu: int) -> _Frame | None:
        stack = self._stack[cpu]
        return stack[-1] if stack else None

    def _close_all(self, cpu: int, t: int) -> None:
        while self._stack[cpu]:
            self._pop(cpu, t)

    def _zero(self, cpu: int, name: str, cat: str, t: int, **args) -> None:
        self._seq += 1
        self.slices.append(Slice(cpu, name, cat, t, t, len(self._stack[cpu]), args, self._seq))

    # -- the replay -------------------------------------------------------------------
    def _event(self, i: int, ev: tuple) -> None:
        e = fields_of(ev)
        kind = e["kind"]
        cpu = e.get("cpu")
        if kind not in EVENTS:
            self._emit(i, None, self._host_t, e)
            return
        if cpu is None:
            self._host(i, kind, e)
            return
        if kind == "q":
            self._last[cpu] = max(self._last[cpu], e["t"])
            self._qend[cpu] = e["t"] + e["quantum"]
            self._emit(i, cpu, self._last[cpu], e)
            return
        if kind == "run":
            self._last[cpu] = max(self._last[cpu], e["t"])
            t = self._last[cpu]
            self._qend[cpu] = max(self._qend[cpu], t)
            pid = e["pid"]
            if self._running[cpu]:
                self._leave(cpu, t)
            self._emit(i, cpu, t, e)        # from <idle>: a task that left went idle first
            self._running[cpu] = pid
            self._on_cpu[pid] = cpu
            comm, _ = self.task(pid)
            self._push(cpu, "task", f"{comm}-{pid}", "task", t, pid=pid, comm=comm)
            return
        t = self._place(cpu, e["t"])
        self._emit(i, cpu, t, e)
        self.end = max(self.end, t)
        addr = e.get("addr")
        if kind == "hit":
            where = self.sym(addr)
            self._push(cpu, "hit", f"kprobe {where}", "kprobe", t, addr=where)
            self._push(cpu, "pre", "pre_handler", "handler", t)
        elif kind == "ret":
            where = self.sym(addr)
            self._push(cpu, "ret", f"kretprobe return to {where}", "kretprobe", t, ret_addr=where)
            self._push(cpu, "rethandler", "kretprobe handler", "handler", t)
        elif kind == "ss":
            top = self._top(cpu)
            if top is not None and top.kind == "pre":
                self._pop(cpu, t)
            how = e["how"]
            reenter = top is not None and top.kind == "reenter"
            if how == "boost":
                # The slot jumps back by itself: the hit is over when the CPU enters it.
                self._zero(cpu, "single-step (boosted)", "single_step", t, how="boosted")
                self._pop_to(cpu, t, ("hit",))
            elif how == "simulate" and reenter:
                self._zero(cpu, "single-step (simulated)", "single_step", t, how="simulated")
                self._pop_to(cpu, t, ("reenter",))
            elif how == "simulate":
                self._push(cpu, "step", "single-step (simulated)", "single_step", t,
                           how="simulated")
            else:
                self._push(cpu, "step", "single-step", "single_step", t, how="out of line")
        elif kind == "ssdone":             # a reentered probe's step is over
            top = self._top(cpu)
            if top is not None and top.kind == "step":
                self._pop(cpu, t)
            self._pop_to(cpu, t, ("reenter",))
        elif kind == "done":
            # The step (if any) ends here: post handlers take no virtual time.
            top = self._top(cpu)
            if top is not None and top.kind == "step":
                self._pop(cpu, t)
                self._zero(cpu, "post_handler", "handler", t)
            self._pop_to(cpu, t, ("hit", "ret"))
        elif kind == "opt":
            # An optimized hit: the pre_handlers run in the detour's hook and take no
            # virtual time; no trap, no step.
            self._zero(cpu, f"kprobe {self.sym(addr)} (optimized)", "kprobe", t,
                       addr=self.sym(addr))
        elif kind == "miss":
            where = self.sym(addr)
            self.instants.append(Instant(cpu, f"kprobe miss {where}", "miss", t, {"addr": where}))
            self._push(cpu, "reenter", f"reentered {where}", "kprobe", t, addr=where)
        elif kind in ("stray", "rp_miss"):
            where = self.sym(addr)
            name = {"stray": "stray trap", "rp_miss": "kretprobe miss"}[kind]
            self.instants.append(Instant(cpu, f"{name} {where}", kind, t, {"addr": where}))
        elif kind == "ipi":
            self.instants.append(Instant(cpu, "sync_core (IPI)", "text_sync", t))
        elif kind == "printk":
            self.instants.append(Instant(cpu, "printk", "printk", t, {"line": e["line"]}))
        elif kind == "sleep":
            self._leave(cpu, t)
        elif kind == "exit":
            for f in self._stack[cpu]:
                if f.kind == "task":
                    f.args["result"] = e["result"]
            self._leave(cpu, t)

    def _leave(self, cpu: int, t: int) -> None:
        pid = self._running[cpu]
        if not pid:
            return
        self._close_all(cpu, t)
        self._running[cpu] = 0
        self._on_cpu.pop(pid, None)

    def _host(self, i: int, kind: str, e: dict) -> None:
        t = e["t"]
        if kind == "new":
            self.comm[e["pid"]] = e["comm"]
        if kind == "wake" and e["pid"] in self._on_cpu:
            # A running task put back on the run queue: preempted, or it called schedule().
            cpu = self._on_cpu[e["pid"]]
            t = self._place(cpu, t)
            self._emit(i, cpu, t, {**e, "kind": "preempt"})
            self._leave(cpu, t)
            return
        # The host's stamps (the latest quantum's start) can lag an acknowledgement stamped
        # with a CPU's clock: keep the host's own events in order.
        t = max(t, self._host_t)
        if kind == "poke":
            self._open_sync[e["sync"]] = (t, {"patches": ", ".join(
                f"{self.sym(a)}={data}" for a, data in e["patches"])})
        elif kind == "synced":
            start, args = self._open_sync.pop(e["sync"], (t, {}))
            t = max(t, start)
            self.spans.append(Span(f"text_poke #{e['sync']}", "text_sync", e["sync"], start, t,
                                   args))
        elif kind == "gp_begin":
            self._open_gp[e["gp"]] = t
        elif kind == "gp":
            start = self._open_gp.pop(e["gp"], t)
            t = max(t, start)
            self.spans.append(Span(f"grace period #{e['gp']}", "grace_period", e["gp"], start, t,
                                   {"completed": e["completed"]}))
        elif kind in ("register", "unregister"):
            where = self.sym(e["addr"]) if e["addr"] is not None else "?"
            self.instants.append(Instant(-1, f"{kind}_{e['type']}probe {where}", "kprobes", t,
                                         {"addr": where}))
        elif kind == "opt_gp_begin":
            self._opt_gp.append((t, {"optimize": e["ops"], "free": e["frees"]}))
        elif kind == "opt_gp_end":
            start, args = self._opt_gp.pop(0) if self._opt_gp else (t, {})
            t = max(t, start)
            self._opt_gps += 1
            self.spans.append(Span(f"optimizer grace period #{self._opt_gps}", "optimizer",
                                   self._opt_gps, start, t, args))
        elif kind in ("opt_queue", "opt_patch", "unopt"):
            where = self.sym(e["addr"])
            name = {"opt_queue": "optimize queued", "opt_patch": "jump written",
                    "unopt": "unoptimized"}[kind]
            self.instants.append(Instant(-1, f"{name} {where}", "optimizer", t,
                                         {"addr": where}))
        self._host_t = max(self._host_t, t)
        self.end = max(self.end, t)
        self._emit(i, None, t, e)


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
    if kind == "opt_gp_begin":
        return "optimizer_wait_start", f"optimize={e['ops']} free={e['frees']}"
    if kind == "opt_gp_end":
        return "optimizer_wait_end", ""
    if kind in ("register", "unregister"):
        where = sym(e["addr"]) if e["addr"] is not None else "?"
        return f"kprobe_{kind}", f"type={e['type']} ({where})"
    if kind == "ss":
        return "kprobe_ss", f"({sym(e['addr'])}) how={e['how']}"
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


def _us(ns: int) -> float:
    return round(ns / 1000, 3)


def perfetto_events(machine) -> list[dict]:
    """The trace as a list of trace-event dicts (ts and dur in µs)."""
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
    for s in tl.slices:
        tid = host if s.track < 0 else s.track
        ev = {"name": s.name, "cat": s.cat, "ph": "X", "ts": _us(s.start),
              "dur": _us(s.end - s.start), "pid": PID, "tid": tid}
        if s.args:
            ev["args"] = s.args
        body.append(((s.start, s.depth, s.seq), ev))
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


# == pictures ================================================================================
class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib, which is not installed: "
                              "pip install 'smpkprobes[plot]' (or matplotlib>=3.8)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


_CAT_COLOURS = {"kprobe": "#d62728", "kretprobe": "#9467bd", "handler": "#ff7f0e",
                "single_step": "#2ca02c"}


def plot_timeline(machine, out, title: str | None = None, start_ns: int = 0,
                  end_ns: int | None = None) -> None:
    """Draw the per-CPU timeline of a (short) run to `out` (a path; the format follows the
    suffix): tasks as coloured bars, probe hits, handlers and single-steps on top, misses
    and stray traps as markers, grace periods and text syncs on rows of their own."""
    plt = _pyplot()
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D

    tl = _Timeline(machine)
    end_ns = tl.end if end_ns is None else end_ns
    n = machine.ncpus
    rows = {"gp": n, "sync": n + 1}
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.55 * (n + 2)), dpi=100)
    comms = sorted({s.args.get("comm", "") for s in tl.slices if s.cat == "task"})
    cmap = plt.get_cmap("tab20")
    colour = {c: cmap((2 * i + 1) % 20) for i, c in enumerate(comms)}

    def bars(items, y, h, **kw):
        xs = [(_us(a), max(_us(b) - _us(a), 0.0)) for a, b in items]
        if xs:
            ax.broken_barh(xs, (y - h / 2, h), **kw)

    for comm in comms:
        for cpu in range(n):
            bars([(s.start, s.end) for s in tl.slices
                  if s.track == cpu and s.cat == "task" and s.args.get("comm") == comm],
                 cpu, 0.7, facecolors=colour[comm], edgecolors="white", linewidth=0.3)
    min_w = (end_ns - start_ns) / 1500 or 1
    for cat, h in (("kprobe", 0.5), ("kretprobe", 0.5), ("handler", 0.34), ("single_step", 0.2)):
        for cpu in range(n):
            bars([(s.start, max(s.end, s.start + min_w)) for s in tl.slices
                  if s.track == cpu and s.cat == cat], cpu, h, facecolors=_CAT_COLOURS[cat])
    marks = {"miss": ("x", "black"), "stray": ("*", "magenta"), "rp_miss": ("v", "purple"),
             "text_sync": ("|", "grey")}
    for cat, (marker, c) in marks.items():
        pts = [(_us(i.t), i.track) for i in tl.instants if i.cat == cat and i.track >= 0]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] + (0.42 if cat == "text_sync" else 0)
                                              for p in pts],
                       marker=marker, color=c, s=22 if cat != "text_sync" else 30, zorder=5,
                       linewidths=1)
    bars([(s.start, max(s.end, s.start + min_w)) for s in tl.spans if s.cat == "grace_period"],
         rows["gp"], 0.6, facecolors="#1f77b4", alpha=0.6)
    bars([(s.start, max(s.end, s.start + min_w)) for s in tl.spans if s.cat == "text_sync"],
         rows["sync"], 0.6, facecolors="#7f7f7f", alpha=0.6)
    ax.set_yticks(list(range(n + 2)), [f"CPU {c}" for c in range(n)] +
                  ["grace periods", "text syncs"])
    ax.set_ylim(n + 1.6, -0.6)
    ax.set_xlim(_us(start_ns), _us(end_ns) * 1.01 + 0.01)
    ax.set_xlabel("virtual time (µs; 1 ns per guest instruction)")
    ax.set_title(f"{title or 'smpkprobes'}: {machine.arch}, {n} CPUs, seed {machine.seed}"
                 f"{', preempt' if machine.preempt else ''}")
    handles = [Patch(facecolor=colour[c], label=c) for c in comms]
    handles += [Patch(facecolor=_CAT_COLOURS[k], label=lbl) for k, lbl in
                (("kprobe", "probe hit"), ("kretprobe", "kretprobe return"),
                 ("handler", "handler"), ("single_step", "single-step"))]
    handles += [Line2D([], [], marker=m_, color=c, linestyle="", label=lbl) for m_, c, lbl in
                (("x", "black", "miss"), ("*", "magenta", "stray trap"),
                 ("v", "purple", "kretprobe miss"), ("|", "grey", "IPI (sync_core)"))]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_curves(curves: dict, out, xlabel: str, ylabel: str, title: str,
                logx: bool = False) -> None:
    """One curve per entry, in order: `curves[label]` is a list of (x, y) points.  The
    maxactive_contention scenario draws nmissed against maxactive with it, one curve per
    CPU count."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(label))
    if logx:
        ax.set_xscale("log", base=2)
        xs = sorted({p[0] for pts in curves.values() for p in pts})
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# == the harness side: exports after a run ===================================================
def require_matplotlib() -> None:
    """Fail early, with the install hint, when `--plot` is asked for without matplotlib."""
    _pyplot()


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

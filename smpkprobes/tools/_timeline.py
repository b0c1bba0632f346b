"""The machine's event trace, and the timeline the exporters draw from it.

The event trace (`m.trace`) is a list of tuples, one per event, appended where the event
happens.  `EVENTS` below names their fields.  Every event carries a virtual timestamp `t` in
ns: a CPU's events are stamped with that CPU's clock (the start of the quantum plus the fixed
cost of each trap taken in it), host events (registration, text_poke, grace periods) with the
machine's time, the start of the latest quantum.

Within one quantum the clock is only known at its start: an event inside it is stamped with
the quantum's start plus the fixed cost of each trap or hypercall taken so far (the time a
handler reads with `regs.cpu.now_ns()`), so its place inside the quantum is approximate.  A
CPU's stamps never run backwards; the timeline keeps them monotonic regardless.

`_Timeline` replays the trace into what the renderings need (`_trace_export` for ftrace
text and Perfetto JSON, `_plot` for pictures): each event placed on its CPU's clock, nested
slices per CPU (task > probe hit > pre_handler / single-step / post_handler), instants
(misses, stray traps, IPIs, printk) and machine-wide spans (grace periods, text syncs).
"""

from __future__ import annotations

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
    # hardware breakpoints (smpkprobes/hw_breakpoint): registration on the host, and each
    # trigger on its CPU: the watched address, the byte accessed, r/w/x, and whether the
    # handler ran after the access ("trap": x86, ppc) or before it ("fault": arm, arm64)
    "bp_register": ("addr", "len", "type", "target", "t"),
    "bp_unregister": ("addr", "len", "type", "target", "t"),
    "bp_hit": ("cpu", "addr", "access_addr", "access", "how", "t"),
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


def _us(ns: int) -> float:
    return round(ns / 1000, 3)


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
        self._host_t = 0
        self._opt_gp: list[tuple[int, dict]] = []     # the optimizer's waits, oldest first
        self._opt_gps = 0
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
        elif kind == "bp_hit":
            where = self.sym(e["access_addr"])
            self.instants.append(Instant(cpu, f"hw_breakpoint {e['access']} {where}",
                                         "hw_breakpoint", t, {"addr": where, "how": e["how"]}))
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
        elif kind in ("bp_register", "bp_unregister"):
            where = self.sym(e["addr"])
            self.instants.append(Instant(-1, f"{kind} {where}/{e['len']}:{e['type']} "
                                             f"({e['target']})", "hw_breakpoint", t,
                                         {"addr": where}))
        self._host_t = max(self._host_t, t)
        self.end = max(self.end, t)
        self._emit(i, None, t, e)

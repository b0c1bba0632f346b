"""tracefs: kprobe-based event tracing, as /sys/kernel/tracing offers it (`m.tracefs`).

    await m.tracefs.write("kprobe_events", "p:myfork do_fork flags=$arg1:x64")
    await m.tracefs.write("kprobe_events", "r:openret do_sys_open ret=$retval:s32", append=True)
    await m.tracefs.write("events/kprobes/enable", "1")
    ...                                            # run something
    print(m.tracefs.read("trace"))

A definition registers a kprobe (or a kretprobe) at once, disabled, as the kernel does; the
event's `enable` file enables it.  Each hit of an enabled event fetches its arguments in the
handler and appends one line to the ring buffer:

    fork_loop-3       [001]     0.000012345: myfork: (do_fork+0x0) flags=0x11

The grammar is in `_tp_parse` (Documentation/trace/kprobetrace.rst); the types and their
evaluation in `_tp_fetch`; the error texts, error positions and error_log in `_tp_errors`.
A second definition with the same GRP/EVENT adds a probe to that event (a multi-probe event)
when its type and arguments agree.  A bad command raises `TraceProbeError` (a `KprobeError`)
and is logged in error_log exactly as the kernel logs it; a command the kernel refuses
without a log entry (not a p/r/- command, a delete of nothing, a busy event) raises a plain
`KprobeError` with the kernel's errno.

The ring buffer is per CPU and bounded (`_tp_buffer`): `buffer_size_kb` (default 1408, the
kernel's) is each CPU's size, in KiB of formatted trace lines; when a CPU's buffer is full
its oldest lines are overwritten, and the trace header's `entries-in-buffer/entries-written`
counts the lines kept against every line written since the last reset.  Removing an event
that was ever enabled resets the buffer, as the kernel's dyn_event_release does.

Files: kprobe_events, dynamic_events, trace, trace_pipe, error_log, kprobe_profile,
set_event, tracing_on, buffer_size_kb, buffer_total_size_kb (read-only),
per_cpu/cpuN/buffer_size_kb, events/enable, events/GRP/enable, events/GRP/EVENT/enable.  `read`
returns str; `write` is async (registering and enabling probes patch text) and truncates like
`echo >`, or appends like `echo >>` with `append=True`.

Modules: a probe on `MOD:SYM` may be defined while MOD is not loaded, and is registered when
it loads.  When MOD unloads, the probe core marks its kprobe GONE and the event stays
defined; writing 1 to its enable file sets the event's flag without arming anything (the
kernel's __enable_trace_kprobe skips a gone probe), and when MOD is loaded again every
`MOD:SYM` probe is unregistered and registered anew, armed if its event is enabled.
"""

from __future__ import annotations

import errno as E
from typing import Callable

from .._errors import KprobeError
from .._ftrace import ftrace_header, ftrace_line
from ..machine._services import STACK_SIZE
from ._core import KPROBE_FLAG_DISABLED, Kprobe, Kretprobe
from ._tp_buffer import TraceBuffer
from ._tp_errors import ERRORS, ErrorLog, TraceProbeError
from ._tp_fetch import Fetcher
from ._tp_defs import Definition, kstrtoul, resolve_symbol
from ._tp_parse import Canceled, Command, parse_create
from ._tp_session import modules_named, parse_workloads, trace_session

__all__ = ["ERRORS", "TraceProbeError", "Tracefs", "modules_named", "parse_workloads",
           "trace_session"]


class TraceEvent:
    """trace_probe_event: GRP/EVENT, its enable flag, and the probes attached to it."""

    def __init__(self, group: str, name: str, is_return: bool):
        self.group, self.name, self.is_return = group, name, is_return
        self.enabled = False
        self.was_enabled = False      # EVENT_FILE_FL_WAS_ENABLED: removing it clears the trace
        self.probes: list[TraceProbe] = []


class TraceProbe:
    """trace_kprobe: one probe point of an event, its kprobe or kretprobe, its hit count."""

    def __init__(self, fs: "Tracefs", d: Definition, event: TraceEvent):
        self.fs, self.d, self.event = fs, d, event
        self.group, self.name = d.group, d.event
        self.nhit = 0
        self.registered = False
        self._missed_before = 0
        self._entry_args = sorted({a for arg in d.args for a in _arg_numbers(arg.code)}) \
            if d.is_return else []
        self._at_entry: dict[int, dict] = {}
        self.probe: Kprobe | Kretprobe | None = None

    @property
    def kp(self) -> Kprobe | None:
        return None if self.probe is None else \
            (self.probe if isinstance(self.probe, Kprobe) else self.probe.kp)

    @property
    def nmissed(self) -> int:
        if self.probe is None:
            return self._missed_before
        own = self.probe.nmissed if isinstance(self.probe, Kretprobe) else 0
        return self._missed_before + self.kp.nmissed + own

    def new_probe(self, addr: int) -> Kprobe | Kretprobe:
        if self.probe is not None:
            self._missed_before = self.nmissed
        if self.d.is_return:
            self.probe = Kretprobe(handler=self._kretprobe_dispatcher, addr=addr,
                                   maxactive=self.d.maxactive,
                                   entry_handler=self._entry if self._entry_args else None)
        else:
            self.probe = Kprobe(addr=addr, pre_handler=self._kprobe_dispatcher)
        if not self.event.enabled:
            self.kp.flags |= KPROBE_FLAG_DISABLED
        return self.probe

    # -- the handlers (they run inside the trap, preemption disabled) -------------------------
    def _kprobe_dispatcher(self, p, regs) -> int:
        self.nhit += 1
        self.fs._record(self, regs, f"({self.fs._sym(p.addr)})", None)
        return 0

    def _entry(self, ri, regs) -> int:
        self._at_entry[id(ri)] = {n: regs.arg(n) for n in self._entry_args}
        return 0

    def _kretprobe_dispatcher(self, ri, regs) -> None:
        self.nhit += 1
        func = self.fs._sym(self.kp.addr).removesuffix("+0x0")
        entry = self._at_entry.pop(id(ri), None)
        self.fs._record(self, regs, f"({self.fs._sym(ri.ret_addr)} <- {func})", entry)


def _arg_numbers(e: tuple) -> list[int]:
    if e[0] == "arg":
        return [e[1]]
    return _arg_numbers(e[2]) if e[0] == "deref" else []


class Tracefs:
    """`m.tracefs`: the kprobe-event corner of /sys/kernel/tracing."""

    def __init__(self, machine, kprobes):
        self._m = machine
        self._k = kprobes
        self._events: dict[tuple[str, str], TraceEvent] = {}
        self._probes: list[TraceProbe] = []          # the dyn_event list, in creation order
        self._buffer = TraceBuffer(machine.ncpus)    # per CPU, buffer_size_kb each
        self._errors = ErrorLog()
        self.tracing_on = True
        self._followers: list[Callable[[str], None]] = []
        self._fetch = Fetcher(machine)
        b = machine.backend
        self._max_stack = STACK_SIZE // b.word_bytes     # PARAM_MAX_STACK
        machine.module_coming_hooks.append(self._module_coming)

    # -- the public face ----------------------------------------------------------------------
    def read(self, path: str) -> str:
        path = path.strip("/")
        if path in ("kprobe_events", "dynamic_events"):
            return "".join(tp.d.line() + "\n" for tp in self._probes)
        if path == "trace":
            buf = self._buffer
            return ftrace_header(buf.entries(), self._m.ncpus, written=buf.written()) + \
                "".join(line + "\n" for line in buf.lines())
        if path == "trace_pipe":
            return "".join(line + "\n" for line in self._buffer.consume())
        if path == "buffer_size_kb":
            return self._buffer.size_kb()
        if path == "buffer_total_size_kb":
            return self._buffer.total_size_kb()
        cpu = self._per_cpu(path, "buffer_size_kb")
        if cpu is not None:
            return self._buffer.size_kb(cpu)
        if path == "error_log":
            return self._errors.read()
        if path == "kprobe_profile":
            return "".join(f"  {tp.name:<44} {tp.nhit:>15} {tp.nmissed:>15}\n"
                           for tp in self._probes)
        if path == "set_event":
            return "".join(f"{ev.group}:{ev.name}\n" for ev in self._events.values()
                           if ev.enabled)
        if path == "tracing_on":
            return "1\n" if self.tracing_on else "0\n"
        events = self._enable_path(path)
        if events is not None:
            states = {ev.enabled for ev in events}
            return "X\n" if len(states) > 1 else ("1\n" if states == {True} else "0\n")
        raise KprobeError(E.ENOENT, f"no tracefs file {path!r}")

    async def write(self, path: str, text: str, append: bool = False) -> None:
        path = path.strip("/")
        if path in ("kprobe_events", "dynamic_events"):
            if not append:
                await self._release(list(self._probes), all_or_nothing=True)
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if words:
                    await self._command(words, dynamic=path == "dynamic_events")
            return
        if path in ("trace", "trace_pipe"):
            if not append:
                self._buffer.reset()
            return
        if path == "buffer_size_kb":
            self._buffer.resize(_size_kb(path, text))
            return
        cpu = self._per_cpu(path, "buffer_size_kb")
        if cpu is not None:
            self._buffer.resize(_size_kb(path, text), cpu)
            return
        if path == "error_log":
            if not append:
                self._errors.clear()
            return
        if path == "set_event":
            await self._set_event(text, append)
            return
        if path == "tracing_on":
            self.tracing_on = _bool(path, text)
            return
        events = self._enable_path(path)
        if events is not None:
            on = _bool(path, text)
            for ev in events:
                await self._enable(ev, on)
            return
        raise KprobeError(E.EACCES if path in ("kprobe_profile", "README", "buffer_total_size_kb")
                          else E.ENOENT,
                          f"cannot write tracefs file {path!r}")

    def follow(self, callback: Callable[[str], None]) -> None:
        """Call `callback(line)` for every trace line as it is recorded (`cat trace_pipe`)."""
        self._followers.append(callback)

    def unfollow(self, callback: Callable[[str], None]) -> None:
        self._followers.remove(callback)

    def events(self) -> list[TraceProbe]:
        """Every probe, in kprobe_events order (a multi-probe event has several)."""
        return list(self._probes)

    # -- commands --------------------------------------------------------------------------------
    async def _command(self, words: list[str], dynamic: bool) -> None:
        if words[0][0] == "-" or (dynamic and words[0][0] == "!"):
            await self._delete(words)
            return
        try:
            d = parse_create(words, self._m, self._register_name, self._max_stack)
            await self._create(Command(words), d)
        except Canceled:
            raise KprobeError(E.EINVAL, f"not a kprobe event command: {' '.join(words)!r}") \
                from None
        except TraceProbeError as err:
            self._errors.add(self._m.now_ns(), err)
            raise

    async def _create(self, cmd: Command, d: Definition) -> None:
        """register_trace_kprobe: a new event, or one more probe on an existing event."""
        ev = self._events.get((d.group, d.event))
        if ev is not None:
            if ev.is_return != d.is_return:
                cmd.fail("DIFF_PROBE_TYPE", 0)
            diff = _compare_args(d.args, ev.probes[0].d.args)
            if diff:
                cmd.fail("DIFF_ARG_TYPE", diff + 1)
            for other in ev.probes:
                o = other.d
                if (o.symbol, o.addr, o.offset) == (d.symbol, d.addr, d.offset) and \
                        all(a.comm == b.comm for a, b in zip(o.args, d.args)):
                    cmd.fail("SAME_PROBE", 0)
        tp = TraceProbe(self, d, ev or TraceEvent(d.group, d.event, d.is_return))
        try:
            await self._register(tp)
        except KprobeError as err:
            if not (err.errno == E.ENOENT and not self._module_exists(d)):
                code = {E.EILSEQ: "BAD_INSN_BNDRY", E.ENOENT: "BAD_PROBE_ADDR"}.get(
                    err.errno, "FAIL_REG_PROBE")
                cmd.fail(code, 1, errno=err.errno)
            # MOD:SYM of a module not loaded: "might be able to register after target
            # module is loaded. Continue."
        if ev is None:
            self._events[(d.group, d.event)] = tp.event
        tp.event.probes.append(tp)
        self._probes.append(tp)

    def _module_exists(self, d: Definition) -> bool:
        """trace_kprobe_module_exist."""
        if d.symbol is None:
            return False
        return d.module is None or d.module in self._m.modules

    async def _register(self, tp: TraceProbe) -> None:
        """__register_trace_kprobe: resolve @SYM arguments and the probe point, register."""
        for sym in sorted({e for a in tp.d.args for e in _symbols(a.code)}):
            cut = min((i for i in (sym.find("+"), sym.find("-")) if i >= 0), default=len(sym))
            offs = kstrtoul(sym[cut:], 0, 64, signed=True) if cut < len(sym) else 0
            if offs is None:
                raise KprobeError(E.EINVAL, f"bad offset in @{sym}")
            base = resolve_symbol(self._m, sym[:cut]) if cut else None
            if base is None:
                raise KprobeError(E.ENOENT, f"no symbol {sym[:cut]!r}")
            self._fetch.symbols[sym] = base + offs
        d = tp.d
        if d.symbol is not None:
            addr = resolve_symbol(self._m, d.symbol)
            if addr is None:
                raise KprobeError(E.ENOENT, f"no symbol {d.symbol!r}")
            addr += d.offset
        else:
            addr = d.addr
        probe = tp.new_probe(addr)
        if d.is_return:
            await self._k.register_kretprobe(probe)
        else:
            await self._k.register_kprobe(probe)
        tp.registered = True

    async def _delete(self, words: list[str]) -> None:
        """dyn_event_release: `-:[GRP/]EVENT [SYM [ARGS]]`, or `!p:...` in dynamic_events."""
        head = words[0]
        if head[0] == "-":
            if head[1:2] != ":":
                raise KprobeError(E.EINVAL, f"{head!r}: a delete is -:[GRP/]EVENT")
            name = head[2:]
        else:
            name = head[head.index(":") + 1:] if ":" in head else None
            if name is None:
                raise KprobeError(E.EINVAL, f"{head!r}: a delete is !p:[GRP/]EVENT ...")
        group, _, event = name.rpartition("/") if "/" in name else (None, "", name)
        if not event:
            raise KprobeError(E.EINVAL, f"{head!r}: no event name")
        matched = [tp for tp in self._probes if tp.name == event
                   and group in (None, tp.group) and tp.d.matches(words[1:])]
        if not matched:
            raise KprobeError(E.ENOENT, f"no such event: {name}")
        await self._release(matched, all_or_nothing=False)

    async def _release(self, probes: list[TraceProbe], all_or_nothing: bool) -> None:
        """unregister_trace_kprobe for each: a probe with siblings always goes; the last probe
        of an enabled event is EBUSY.  Clearing the whole file checks every event first."""
        def busy(tp):
            return tp.event.enabled and not (set(tp.event.probes) - set(probes))
        if all_or_nothing:
            bad = next((tp for tp in probes if tp.event.enabled), None)
            if bad is not None:
                raise KprobeError(E.EBUSY, f"event {bad.group}/{bad.name} is enabled; "
                                           f"disable it first")
        gone = [tp for tp in probes if not busy(tp)]
        kps = [tp.probe for tp in gone if tp.registered and not tp.d.is_return]
        rps = [tp.probe for tp in gone if tp.registered and tp.d.is_return]
        if kps:                              # one grace period for all, as the kernel's batch
            await self._k.unregister_kprobes(kps)
        if rps:
            await self._k.unregister_kretprobes(rps)
        clear = False
        for tp in gone:
            tp.registered = False
            self._probes.remove(tp)
            tp.event.probes.remove(tp)
            if not tp.event.probes:
                del self._events[(tp.group, tp.name)]
                clear |= tp.event.was_enabled
        if clear:                            # tracing_reset_all_online_cpus, clear_trace set
            self._buffer.reset()
        if len(gone) < len(probes):
            ev = next(tp.event for tp in probes if tp not in gone)
            raise KprobeError(E.EBUSY, f"event {ev.group}/{ev.name} is enabled; disable it "
                                       f"first")

    # -- enable, set_event -------------------------------------------------------------------------
    async def _enable(self, ev: TraceEvent, on: bool) -> None:
        """enable_trace_kprobe / disable_trace_kprobe.  The flag first: a CPU may hit the
        probe while the text is being patched.  A probe not registered (its module is not
        loaded) or gone (its module was unloaded) is skipped, as the kernel skips it."""
        if on == ev.enabled:
            return
        ev.enabled = on
        ev.was_enabled |= on
        done = []
        try:
            for tp in ev.probes:
                if not tp.registered or (on and tp.kp.gone):
                    continue
                if on:
                    await self._k.enable_kprobe(tp.kp)
                else:
                    await self._k.disable_kprobe(tp.kp)
                done.append(tp)
        except BaseException:
            ev.enabled = not on
            for tp in done:
                await (self._k.disable_kprobe if on else self._k.enable_kprobe)(tp.kp)
            raise

    def _per_cpu(self, path: str, name: str) -> int | None:
        """N of `per_cpu/cpuN/<name>` (ENOENT for a CPU the machine does not have)."""
        parts = path.split("/")
        if len(parts) != 3 or parts[0] != "per_cpu" or parts[2] != name \
                or not parts[1].startswith("cpu"):
            return None
        n = parts[1][3:]
        if not (n.isdigit() and str(int(n)) == n and int(n) < self._m.ncpus):
            raise KprobeError(E.ENOENT, f"no tracefs file {path!r}")
        return int(n)

    def _enable_path(self, path: str) -> list[TraceEvent] | None:
        parts = path.split("/")
        if parts[0] != "events" or parts[-1] != "enable":
            return None
        if len(parts) == 2:
            return list(self._events.values())
        if len(parts) == 3:
            evs = [ev for (g, _), ev in self._events.items() if g == parts[1]]
            if evs:
                return evs
        if len(parts) == 4 and (parts[1], parts[2]) in self._events:
            return [self._events[(parts[1], parts[2])]]
        raise KprobeError(E.ENOENT, f"no tracefs file {path!r}")

    async def _set_event(self, text: str, append: bool) -> None:
        """set_event: `GRP:EVENT`, `EVENT` or `GRP` (either name), `*` for any part, `!` to
        disable.  A truncating write disables every event first."""
        if not append:
            for ev in list(self._events.values()):
                await self._enable(ev, False)
        for word in text.split():
            on = not word.startswith("!")
            spec = word.lstrip("!")
            if ":" in spec:
                sub, _, name = spec.partition(":")
                picks = [ev for ev in self._events.values()
                         if sub in ("", "*", ev.group) and name in ("", "*", ev.name)]
            else:
                picks = [ev for ev in self._events.values() if spec in (ev.name, ev.group)]
            if not picks:
                raise KprobeError(E.EINVAL, f"set_event: no event matches {word!r}")
            for ev in picks:
                await self._enable(ev, on)

    # -- modules -----------------------------------------------------------------------------------
    async def _module_coming(self, module) -> None:
        """trace_kprobe_module_callback (MODULE_STATE_COMING): every `MOD:SYM` probe of this
        module is unregistered and registered anew, armed if its event is enabled."""
        for tp in [tp for tp in self._probes if tp.d.module == module.name]:
            if tp.registered:
                unregister = self._k.unregister_kretprobe if tp.d.is_return \
                    else self._k.unregister_kprobe
                await unregister(tp.probe)
                tp.registered = False
            try:
                await self._register(tp)
            except KprobeError as err:
                self._m.printk_log.append(f"trace_kprobe: Failed to re-register probe "
                                          f"{tp.name} on {module.name}:{err.errno}\n")

    # -- what the handlers use --------------------------------------------------------------
    def _register_name(self, name: str) -> str | None:
        """The register a `%name` stands for, as the backend's register records declare
        it (its name or an alias: the kernel's pt_regs spelling, x86's %ax for rax/eax)."""
        reg = self._m.backend.register_by_name(name)
        return None if reg is None else reg.name

    def _sym(self, addr: int) -> str:
        s = self._m.symbolize(addr)
        if s is None:
            return f"0x{addr:x}"
        return f"{s[0]}+{s[1]:#x}"

    def _record(self, tp: TraceProbe, regs, where: str, entry: dict | None) -> None:
        if not tp.event.enabled or not self.tracing_on:
            return
        cpu = regs.cpu
        task = cpu.current
        comm = task.comm if task else "<idle>"
        body = where + "".join(f" {a.name}={self._fetch.format(a, regs, entry, comm)}"
                               for a in tp.d.args)
        line = ftrace_line(comm, task.pid if task else 0, cpu.id, cpu.now_ns(), tp.name, body)
        self._buffer.write(cpu.id, line)
        if self._followers:
            for f in list(self._followers):
                f(line)

    def entries_written(self) -> int:
        """Trace lines recorded since the buffer was last reset, overwritten ones included
        (the header's entries-written)."""
        return self._buffer.written()


def _compare_args(a: list, b: list) -> int:
    """trace_probe_compare_arg_type: 0, or the 1-based index of the first difference."""
    if len(a) != len(b):
        return min(len(a), len(b)) + 1
    return next((i + 1 for i, (x, y) in enumerate(zip(a, b)) if not x.same_type(y)), 0)


def _symbols(e: tuple) -> list[str]:
    if e[0] == "sym":
        return [e[1]]
    return _symbols(e[2]) if e[0] == "deref" else []


def _size_kb(path: str, text: str) -> int:
    """tracing_entries_write: a decimal number of KiB per CPU, not 0."""
    val = kstrtoul(text, 10)
    if val is None:
        digits = text[:-1] if text.endswith("\n") else text
        if digits and all(c in "0123456789" for c in digits):
            raise KprobeError(E.ERANGE, f"{path}: {text!r} is out of range")
        raise KprobeError(E.EINVAL, f"{path} takes a number of KiB per CPU, not {text!r}")
    if val == 0:
        raise KprobeError(E.EINVAL, f"{path} cannot be 0")
    return val


def _bool(path: str, text: str) -> bool:
    v = text.strip()
    if v in ("1", "0"):
        return v == "1"
    raise KprobeError(E.EINVAL, f"{path} takes 0 or 1, not {text!r}")

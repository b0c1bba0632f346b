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

The grammar (Documentation/trace/kprobetrace.rst):

    p[:[GRP/]EVENT] SYMBOL[+offs]|ADDR [FETCHARGS]            a probe
    r[MAXACTIVE][:[GRP/]EVENT] SYMBOL[+0] [FETCHARGS]        a return probe
    -:[GRP/]EVENT                                            delete an event

    FETCHARG:  %REG  $argN (N >= 1)  $retval  $stack  $stackN  $comm  @ADDR  @SYM[+offs]
               +|-OFFS(FETCHARG)      and  NAME=FETCHARG:TYPE, TYPE one of
               u8..u64, s8..s64, x8..x64 (the default is x32/x64, the word size), string

A bad definition raises `TraceProbeError` (a `KprobeError`) that names the token, its column
and the reason, in the words of the kernel's error_log, which it is also appended to.

Files: kprobe_events, trace, trace_pipe, error_log, kprobe_profile, tracing_on,
events/enable, events/GRP/enable, events/GRP/EVENT/enable.  `read` returns str; `write` is
async (registering and enabling probes patch text) and truncates like `echo >`, or appends
like `echo >>` with `append=True`.  The trace lists records in the order the handlers ran.
"""

from __future__ import annotations

import errno as E
import functools
import re
from dataclasses import dataclass
from typing import Callable

import trio

from .._errors import KprobeError
from ._core import KPROBE_FLAG_DISABLED, Kprobe, Kretprobe, regs_return_value
from ..tools._trace_export import format_ts, ftrace_header, ftrace_line

MAX_EVENT_NAME_LEN = 64
MAX_ARG_NAME_LEN = 32
MAX_TRACE_ARGS = 128
MAX_DEREF_DEPTH = 16
KRETPROBE_MAXACTIVE_MAX = 4096
MAX_STRING_SIZE = 256
DEFAULT_GROUP = "kprobes"

# The kernel's error_log messages (kernel/trace/trace_probe.h), and the errno of each.
ERRORS: dict[str, tuple[int, str]] = {
    "BAD_PROBE_TYPE": (E.EINVAL, "Probe type must be p, r or -"),
    "BAD_MAXACT_TYPE": (E.EINVAL, "Maxactive is only for function exit"),
    "BAD_MAXACT": (E.EINVAL, "Invalid maxactive number"),
    "MAXACT_TOO_BIG": (E.E2BIG, "Maxactive is too big"),
    "NO_GROUP_NAME": (E.EINVAL, "Group name is not specified"),
    "GROUP_TOO_LONG": (E.EINVAL, "Group name is too long"),
    "BAD_GROUP_NAME": (E.EINVAL, "Group name must follow the same rules as C identifiers"),
    "NO_EVENT_NAME": (E.EINVAL, "Event name is not specified"),
    "EVENT_TOO_LONG": (E.EINVAL, "Event name is too long"),
    "BAD_EVENT_NAME": (E.EINVAL, "Event name must follow the same rules as C identifiers"),
    "EVENT_EXIST": (E.EEXIST, "Given group/event name is already used by another event"),
    "NO_PROBE_POINT": (E.EINVAL, "Probe point is not specified"),
    "BAD_PROBE_ADDR": (E.ENOENT, "Invalid probed address or symbol"),
    "BAD_RETPROBE": (E.EINVAL, "Retprobe address must be an function entry"),
    "BAD_INSN_BNDRY": (E.EILSEQ, "Probe point is not an instruction boundary"),
    "FAIL_REG_PROBE": (E.EINVAL, "Failed to register probe event"),
    "TOO_MANY_ARGS": (E.EINVAL, "Too many arguments are specified"),
    "NO_ARG_NAME": (E.EINVAL, "Argument name is not specified"),
    "ARG_NAME_TOO_LONG": (E.EINVAL, "Argument name is too long"),
    "BAD_ARG_NAME": (E.EINVAL, "Argument name must follow the same rules as C identifiers"),
    "USED_ARG_NAME": (E.EINVAL, "This argument name is already used"),
    "NO_ARG_BODY": (E.EINVAL, "No argument expression"),
    "BAD_TYPE": (E.EINVAL, "Unknown type is specified"),
    "BAD_STRING": (E.EINVAL, "String accepts only memory argument"),
    "NEED_STRING_TYPE": (E.EINVAL, "$comm and immediate-string only accepts string type"),
    "RETVAL_ON_PROBE": (E.EINVAL, "$retval is not available on probe"),
    "BAD_STACK_NUM": (E.EINVAL, "Invalid stack number"),
    "BAD_ARG_NUM": (E.EINVAL, "Invalid argument number"),
    "NOFENTRY_ARGS": (E.EINVAL, "$arg* can be used only on function entry or exit"),
    "BAD_VAR": (E.EINVAL, "Invalid $-variable specified"),
    "BAD_REG_NAME": (E.EINVAL, "Invalid register name"),
    "BAD_MEM_ADDR": (E.EINVAL, "Invalid memory address"),
    "DEREF_NEED_BRACE": (E.EINVAL, "Dereference needs a brace"),
    "BAD_DEREF_OFFS": (E.EINVAL, "Invalid dereference offset"),
    "DEREF_OPEN_BRACE": (E.EINVAL, "Dereference is not closed"),
    "TOO_MANY_OPS": (E.EINVAL, "Dereference is too much nested"),
    "COMM_CANT_DEREF": (E.EINVAL, "$comm can not be dereferenced"),
    "BAD_FETCH_ARG": (E.EINVAL, "Invalid fetch argument"),
    "NO_SUCH_EVENT": (E.ENOENT, "No such event"),
    "EVENT_BUSY": (E.EBUSY, "Event is enabled; disable it first"),
}

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TYPE = re.compile(r"([usx])(8|16|32|64)|string")


class TraceProbeError(KprobeError):
    """A kprobe_events definition the kernel would refuse.  `.code` is the error_log code
    (e.g. "BAD_REG_NAME"), `.reason` its message, `.token` the offending text, `.column`
    its 1-based column in `.command`."""

    def __init__(self, code: str, command: str, column: int, token: str, detail: str = "",
                 errno: int | None = None):
        err, reason = ERRORS[code]
        self.code, self.reason, self.command = code, reason, command
        self.column, self.token = column, token
        self.log = (f"trace_kprobe: error: {reason}{detail}\n  Command: {command}\n"
                    f"{' ' * (10 + column)}^\n")
        super().__init__(errno if errno is not None else err,
                         f"trace_kprobe: error: {reason}{detail}: {token!r} at column {column}\n"
                         f"  Command: {command}\n{' ' * (10 + column)}^")


# == parsing ================================================================================
@dataclass(frozen=True)
class FetchArg:
    """One `NAME=FETCHARG:TYPE`: `expr` is a small tree ("reg", name) | ("arg", n) |
    ("stack", n or None) | ("retval",) | ("comm",) | ("mem", addr) | ("deref", offs, expr)."""

    name: str
    text: str            # as written after `NAME=`, type included (kprobe_events shows it)
    expr: tuple
    type: str            # "u32", "s64", "x64", "string"...


@dataclass
class _Definition:
    kind: str            # "p" or "r"
    group: str
    event: str
    symbol: str | None
    offset: int
    addr: int | None
    maxactive: int
    args: list[FetchArg]


def _uint(text: str) -> int | None:
    """kstrtoul(s, 0): 0x hex, leading-0 octal, else decimal."""
    try:
        if text[:2].lower() == "0x":
            return int(text[2:], 16)
        if len(text) > 1 and text[0] == "0":
            return int(text[1:], 8)
        return int(text, 10) if text.isdigit() else None
    except ValueError:
        return None


class _Parser:
    """One line of kprobe_events, with the positions its errors point at."""

    def __init__(self, tracefs: "Tracefs", line: str):
        self.fs = tracefs
        self.line = line
        self.tokens = [(m.group(), m.start()) for m in re.finditer(r"\S+", line)]

    def fail(self, code: str, col: int, token: str, detail: str = "", errno=None):
        raise TraceProbeError(code, self.line, col + 1, token, detail, errno)

    # -- the probe head: p/r[N][:[GRP/]EVENT] -------------------------------------------------
    def head(self) -> tuple[str, int, str | None, str | None]:
        tok, col = self.tokens[0]
        kind = tok[0]
        if kind not in "pr-":
            self.fail("BAD_PROBE_TYPE", col, tok)
        colon = tok.find(":")
        mid = tok[1:colon] if colon >= 0 else tok[1:]
        maxactive = 0
        if kind == "-":
            if colon != 1:
                self.fail("NO_EVENT_NAME" if colon < 0 else "BAD_PROBE_TYPE", col, tok)
        elif mid:
            if not mid[0].isdigit():
                self.fail("BAD_PROBE_TYPE", col, tok)
            if kind == "p":
                self.fail("BAD_MAXACT_TYPE", col + 1, mid)
            n = _uint(mid)
            if not n:
                self.fail("BAD_MAXACT", col + 1, mid)
            if n > KRETPROBE_MAXACTIVE_MAX:
                self.fail("MAXACT_TOO_BIG", col + 1, mid, f" (at most {KRETPROBE_MAXACTIVE_MAX})")
            maxactive = n
        group = event = None
        if colon >= 0:
            group, event = self.event_name(tok[colon + 1:], col + colon + 1)
        return kind, maxactive, group, event

    def event_name(self, text: str, col: int) -> tuple[str | None, str | None]:
        group = None
        slash = text.find("/")
        if slash >= 0:
            group = text[:slash]
            if not group:
                self.fail("NO_GROUP_NAME", col, text)
            if len(group) >= MAX_EVENT_NAME_LEN:
                self.fail("GROUP_TOO_LONG", col, group)
            if not _IDENT.fullmatch(group):
                self.fail("BAD_GROUP_NAME", col, group)
            col += slash + 1
            text = text[slash + 1:]
            if not text:
                return group, None                 # `GRP/`: the event name is generated
        if not text:
            self.fail("NO_EVENT_NAME", col - 1, ":")
        if len(text) > MAX_EVENT_NAME_LEN:
            self.fail("EVENT_TOO_LONG", col, text)
        if not _IDENT.fullmatch(text):
            self.fail("BAD_EVENT_NAME", col, text)
        return group, text

    # -- the probe point --------------------------------------------------------------------
    def probe_point(self, kind: str) -> tuple[str | None, int, int | None]:
        if len(self.tokens) < 2:
            self.fail("NO_PROBE_POINT", len(self.line.rstrip()), self.tokens[0][0])
        tok, col = self.tokens[1]
        m = self.fs._m
        if tok[0].isdigit():
            addr = _uint(tok)
            if addr is None:
                self.fail("BAD_PROBE_ADDR", col, tok)
            func = m.kallsyms.containing(addr)
            if kind == "r" and (func is None or func.addr != addr):
                self.fail("BAD_RETPROBE", col, tok)
            return None, 0, addr
        sym, plus, offs = tok.partition("+")
        offset = 0
        if plus:
            offset = _uint(offs) if offs else None
            if offset is None:
                self.fail("BAD_PROBE_ADDR", col + len(sym), "+" + offs, " (bad offset)")
        if not re.fullmatch(r"[A-Za-z_.][\w.]*", sym):
            self.fail("BAD_PROBE_ADDR", col, tok)
        if not m.kallsyms_lookup_name(sym):
            self.fail("BAD_PROBE_ADDR", col, sym, " (no such symbol)")
        if kind == "r" and offset:
            self.fail("BAD_RETPROBE", col, tok)
        return sym, offset, None

    # -- fetchargs ----------------------------------------------------------------------------
    def fetcharg(self, index: int, tok: str, col: int, kind: str, offset: int,
                 used: set[str]) -> FetchArg:
        name, eq, body = tok.partition("=")
        bcol = col
        if eq:
            if not name:
                self.fail("NO_ARG_NAME", col, tok)
            if len(name) > MAX_ARG_NAME_LEN:
                self.fail("ARG_NAME_TOO_LONG", col, name)
            if not _IDENT.fullmatch(name):
                self.fail("BAD_ARG_NAME", col, name)
            bcol = col + len(name) + 1
        else:
            name, body = f"arg{index}", tok
        if name in used:
            self.fail("USED_ARG_NAME", col, name)
        text = body
        body, colon, typ = body.partition(":")
        if not body:
            self.fail("NO_ARG_BODY", col, tok)
        if colon and not _TYPE.fullmatch(typ):
            where = bcol + len(body) + (1 if typ else 0)
            self.fail("BAD_TYPE", where, typ or ":", " (u8..u64, s8..s64, x8..x64 or string)")
        expr = self.expr(body, bcol, kind, offset, 0)
        if expr[0] == "comm":
            if colon and typ != "string":
                self.fail("NEED_STRING_TYPE", bcol + len(body) + 1, typ)
            typ = "string"
        elif not colon:
            typ = f"x{self.fs._m.backend.bits}"
        if typ == "string" and expr[0] not in ("deref", "mem", "comm"):
            self.fail("BAD_STRING", bcol, body)
        return FetchArg(name, text, expr, typ)

    def expr(self, s: str, col: int, kind: str, offset: int, depth: int) -> tuple:
        if depth > MAX_DEREF_DEPTH:
            self.fail("TOO_MANY_OPS", col, s)
        c = s[0]
        if c == "%":
            reg = self.fs._register_name(s[1:])
            if reg is None:
                self.fail("BAD_REG_NAME", col, s)
            return ("reg", reg)
        if c == "$":
            var = s[1:]
            if var == "retval":
                if kind != "r":
                    self.fail("RETVAL_ON_PROBE", col, s)
                return ("retval",)
            if var == "comm":
                if depth:
                    self.fail("COMM_CANT_DEREF", col, s)
                return ("comm",)
            if var.startswith("stack"):
                n = var[5:]
                if not n:
                    return ("stack", None)
                num = _uint(n)
                if num is None:
                    self.fail("BAD_STACK_NUM", col, s)
                return ("stack", num)
            if var.startswith("arg"):
                num = _uint(var[3:]) if var[3:] else None
                if not num:
                    self.fail("BAD_ARG_NUM", col, s, " ($argN counts from 1)")
                if kind == "p" and offset:
                    self.fail("NOFENTRY_ARGS", col, s)
                return ("arg", num)
            self.fail("BAD_VAR", col, s)
        if c == "@":
            target = s[1:]
            if target[:1].isdigit():
                addr = _uint(target)
            else:
                sym, plus, offs = target.partition("+")
                base = self.fs._m.kallsyms_lookup_name(sym) if sym else 0
                off = _uint(offs) if plus else 0
                addr = base + off if base and off is not None else None
            if addr is None:
                self.fail("BAD_MEM_ADDR", col, s)
            return ("mem", addr)
        if c in "+-":
            paren = s.find("(")
            if paren < 0:
                self.fail("DEREF_NEED_BRACE", col, s)
            offs = _uint(s[1:paren]) if paren > 1 else None
            if offs is None:
                self.fail("BAD_DEREF_OFFS", col, s[:paren] or s)
            if not s.endswith(")"):
                self.fail("DEREF_OPEN_BRACE", col + paren, s[paren:])
            inner = s[paren + 1:-1]
            if not inner:
                self.fail("BAD_FETCH_ARG", col + paren, s[paren:])
            return ("deref", -offs if c == "-" else offs,
                    self.expr(inner, col + paren + 1, kind, offset, depth + 1))
        self.fail("BAD_FETCH_ARG", col, s)

    def definition(self) -> _Definition | tuple[str, str]:
        kind, maxactive, group, event = self.head()
        if kind == "-":
            return group, event
        symbol, offset, addr = self.probe_point(kind)
        args, used = [], set()
        if len(self.tokens) - 2 > MAX_TRACE_ARGS:
            tok, col = self.tokens[2 + MAX_TRACE_ARGS]
            self.fail("TOO_MANY_ARGS", col, tok)
        for i, (tok, col) in enumerate(self.tokens[2:], start=1):
            a = self.fetcharg(i, tok, col, kind, offset, used)
            used.add(a.name)
            args.append(a)
        if event is None:
            where = f"{symbol}_{offset}" if symbol is not None else f"0x{addr:x}"
            event = f"{kind}_{where}".replace(".", "_")[:MAX_EVENT_NAME_LEN]
        return _Definition(kind, group or DEFAULT_GROUP, event, symbol, offset, addr, maxactive,
                           args)


# == an event ===================================================================================
class TraceKprobe:
    """One dynamic event: its definition, its probe, its counters."""

    def __init__(self, fs: "Tracefs", d: _Definition, line: str):
        self.fs = fs
        self.d = d
        self.group, self.name = d.group, d.event
        self.nhit = 0
        self.enabled = False
        self._entry_args = any(_uses_arg(a.expr) for a in d.args) and d.kind == "r"
        self._at_entry: dict[int, dict] = {}
        where = dict(symbol_name=d.symbol, addr=None if d.symbol else d.addr)
        if d.kind == "p":
            self.probe = Kprobe(offset=d.offset, pre_handler=self._kprobe_dispatcher, **where)
            self.kp = self.probe
        else:
            self.probe = Kretprobe(handler=self._kretprobe_dispatcher, maxactive=d.maxactive,
                                   entry_handler=self._entry if self._entry_args else None,
                                   **where)
            self.kp = self.probe.kp
        self.kp.flags |= KPROBE_FLAG_DISABLED

    @property
    def nmissed(self) -> int:
        return self.kp.nmissed + (self.probe.nmissed if self.d.kind == "r" else 0)

    def definition(self) -> str:
        d = self.d
        head = d.kind + (str(d.maxactive) if d.kind == "r" and d.maxactive else "")
        if d.symbol is None:
            where = f"0x{d.addr:x}"
        else:
            where = d.symbol + (f"+{d.offset}" if d.offset else "")
        args = "".join(f" {a.name}={a.text}" for a in d.args)
        return f"{head}:{d.group}/{d.event} {where}{args}"

    # -- the handlers (they run inside the trap, preemption disabled) -------------------------
    def _kprobe_dispatcher(self, p, regs) -> int:
        self.nhit += 1
        self.fs._record(self, regs, f"({self.fs._sym(p.addr)})", None)
        return 0

    def _entry(self, ri, regs) -> int:
        self._at_entry[id(ri)] = {n: regs.arg(n - 1) for n in _arg_numbers(self.d.args)}
        return 0

    def _kretprobe_dispatcher(self, ri, regs) -> None:
        self.nhit += 1
        func = self.fs._sym(self.kp.addr).removesuffix("+0x0")
        entry = self._at_entry.pop(id(ri), None)
        self.fs._record(self, regs, f"({self.fs._sym(ri.ret_addr)} <- {func})", entry)


def _uses_arg(expr: tuple) -> bool:
    return expr[0] == "arg" or (expr[0] == "deref" and _uses_arg(expr[2]))


def _arg_numbers(args: list[FetchArg]) -> list[int]:
    out = []

    def walk(e):
        if e[0] == "arg":
            out.append(e[1])
        elif e[0] == "deref":
            walk(e[2])
    for a in args:
        walk(a.expr)
    return sorted(set(out))


@dataclass(frozen=True)
class TraceRecord:
    ts: int
    cpu: int
    pid: int
    comm: str
    event: str
    body: str

    def line(self) -> str:
        return ftrace_line(self.comm, self.pid, self.cpu, self.ts, self.event, self.body)


# == the file system ============================================================================
class Tracefs:
    """`m.tracefs`: the kprobe-event corner of /sys/kernel/tracing."""

    def __init__(self, machine, kprobes):
        self._m = machine
        self._k = kprobes
        self._events: dict[tuple[str, str], TraceKprobe] = {}
        self._buffer: list[TraceRecord] = []
        self._read_pos = 0              # trace_pipe's position
        self._written = 0
        self._error_log: list[str] = []
        self.tracing_on = True
        self._followers: list[Callable[[str], None]] = []
        b = machine.backend
        self._regs = set(b.registers)
        self._aliases = dict(machine.cpus[0].reg_aliases)
        self._word, self._endian = b.word_bytes, b.endian

    # -- the public face ----------------------------------------------------------------------
    def read(self, path: str) -> str:
        path = path.strip("/")
        if path == "kprobe_events":
            return "".join(ev.definition() + "\n" for ev in self._events.values())
        if path == "trace":
            return ftrace_header(len(self._buffer), self._m.ncpus, extra=()) + \
                "".join(r.line() + "\n" for r in self._buffer)
        if path == "trace_pipe":
            new = self._buffer[self._read_pos:]
            self._read_pos = len(self._buffer)
            return "".join(r.line() + "\n" for r in new)
        if path == "error_log":
            return "".join(self._error_log)
        if path == "kprobe_profile":
            return "".join(f"  {ev.name:<44} {ev.nhit:>15} {ev.nmissed:>15}\n"
                           for ev in self._events.values())
        if path == "tracing_on":
            return "1\n" if self.tracing_on else "0\n"
        events = self._enable_path(path)
        if events is not None:
            states = {ev.enabled for ev in events}
            return "X\n" if len(states) > 1 else ("1\n" if states == {True} else "0\n")
        raise KprobeError(E.ENOENT, f"no tracefs file {path!r}")

    async def write(self, path: str, text: str, append: bool = False) -> None:
        path = path.strip("/")
        if path == "kprobe_events":
            if not append:
                await self._release_all()
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    await self._command(line)
            return
        if path in ("trace", "trace_pipe"):
            if not append:
                self._buffer.clear()
                self._read_pos = 0
            return
        if path == "error_log":
            if not append:
                self._error_log.clear()
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
        writable = ("kprobe_profile",)
        raise KprobeError(E.EACCES if path in writable else E.ENOENT,
                          f"cannot write tracefs file {path!r}")

    def follow(self, callback: Callable[[str], None]) -> None:
        """Call `callback(line)` for every trace line as it is recorded (`cat trace_pipe`)."""
        self._followers.append(callback)

    def unfollow(self, callback: Callable[[str], None]) -> None:
        self._followers.remove(callback)

    def events(self) -> list[TraceKprobe]:
        return list(self._events.values())

    # -- kprobe_events commands ------------------------------------------------------------------
    async def _command(self, line: str) -> None:
        p = _Parser(self, line)
        try:
            d = p.definition()
            if isinstance(d, tuple):
                await self._delete(p, *d)
                return
            if (d.group, d.event) in self._events:
                tok, col = p.tokens[0]
                p.fail("EVENT_EXIST", col + tok.find(":") + 1, f"{d.group}/{d.event}")
            ev = TraceKprobe(self, d, line)
            try:
                if d.kind == "p":
                    await self._k.register_kprobe(ev.probe)
                else:
                    await self._k.register_kretprobe(ev.probe)
            except KprobeError as err:
                tok, col = p.tokens[1]
                if err.errno == E.EILSEQ:
                    p.fail("BAD_INSN_BNDRY", col, tok)
                p.fail("FAIL_REG_PROBE", col, tok, f" ({err.strerror})", errno=err.errno)
            self._events[(d.group, d.event)] = ev
        except TraceProbeError as err:
            self._error_log.append(f"[{format_ts(self._m.now_ns())}] {err.log}")
            raise

    async def _delete(self, p: _Parser, group: str | None, event: str | None) -> None:
        """`-:[GRP/]EVENT`; without GRP the event is looked for in every group."""
        tok, col = p.tokens[0]
        keys = [k for k in self._events if k[1] == event and group in (None, k[0])]
        if not keys:
            p.fail("NO_SUCH_EVENT", col + 2, tok[2:])
        if any(self._events[k].enabled for k in keys):
            p.fail("EVENT_BUSY", col + 2, tok[2:])
        await self._unregister([self._events[k] for k in keys])
        for k in keys:
            del self._events[k]

    async def _release_all(self) -> None:
        busy = [ev for ev in self._events.values() if ev.enabled]
        if busy:
            raise KprobeError(E.EBUSY, f"kprobe_events: event {busy[0].group}/{busy[0].name} is "
                                       f"enabled; disable it before clearing")
        await self._unregister(list(self._events.values()))
        self._events.clear()

    async def _unregister(self, events: list[TraceKprobe]) -> None:
        # One grace period for all, as the kernel's batch unregistration.
        kps = [ev.probe for ev in events if ev.d.kind == "p"]
        rps = [ev.probe for ev in events if ev.d.kind == "r"]
        if kps:
            await self._k.unregister_kprobes(kps)
        if rps:
            await self._k.unregister_kretprobes(rps)

    async def _enable(self, ev: TraceKprobe, on: bool) -> None:
        if on == ev.enabled:
            return
        # The flag first: a CPU may hit the probe while the text is being patched.
        ev.enabled = on
        try:
            if on:
                await self._k.enable_kprobe(ev.kp)
            else:
                await self._k.disable_kprobe(ev.kp)
        except BaseException:
            ev.enabled = not on
            raise

    def _enable_path(self, path: str) -> list[TraceKprobe] | None:
        parts = path.split("/")
        if parts[0] != "events" or parts[-1] != "enable":
            return None
        if len(parts) == 2:
            return list(self._events.values())
        if len(parts) == 3:
            evs = [ev for (g, _), ev in self._events.items() if g == parts[1]]
            if not evs:
                raise KprobeError(E.ENOENT, f"no tracefs file {path!r}")
            return evs
        if len(parts) == 4 and (parts[1], parts[2]) in self._events:
            return [self._events[(parts[1], parts[2])]]
        raise KprobeError(E.ENOENT, f"no tracefs file {path!r}")

    # -- what the handlers use --------------------------------------------------------------
    def _register_name(self, name: str) -> str | None:
        """A register by the arch's name, regs' aliases (ip, sp, flags), or the kernel's
        pt_regs spelling (x86: %ax, %di for rax/eax, rdi/edi)."""
        if name in self._regs:
            return name
        if name in self._aliases:
            return self._aliases[name]
        if name.isalpha():
            for prefix in ("r", "e"):
                if prefix + name in self._regs:
                    return prefix + name
        return None

    def _sym(self, addr: int) -> str:
        s = self._m.symbolize(addr)
        if s is None:
            return f"0x{addr:x}"
        return f"{s[0]}+{s[1]:#x}"

    def _record(self, ev: TraceKprobe, regs, where: str, entry: dict | None) -> None:
        if not ev.enabled or not self.tracing_on:
            return
        cpu = regs.cpu
        task = cpu.current
        body = where + "".join(f" {a.name}={self._fetch(a, regs, entry)}" for a in ev.d.args)
        rec = TraceRecord(cpu.now_ns(), cpu.id, task.pid if task else 0,
                          task.comm if task else "<idle>", ev.name, body)
        self._buffer.append(rec)
        self._written += 1
        if self._followers:
            line = rec.line()
            for f in list(self._followers):
                f(line)

    def _fetch(self, a: FetchArg, regs, entry: dict | None) -> str:
        try:
            if a.type == "string":
                if a.expr[0] == "comm":
                    task = regs.cpu.current
                    return f'"{task.comm if task else "<idle>"}"'
                return '"' + self._cstring(self._address(a.expr, regs, entry)) + '"'
            size = int(a.type[1:]) // 8
            if a.expr[0] in ("deref", "mem"):
                raw = self._m.read_memory(self._address(a.expr, regs, entry), size)
                v = int.from_bytes(raw, self._endian)
            else:
                v = self._value(a.expr, regs, entry) & ((1 << (8 * size)) - 1)
        except (ValueError, OSError):        # an unmapped guest address
            return "(fault)"
        bits = 8 * size
        if a.type[0] == "s":
            return str(v - (1 << bits) if v >> (bits - 1) else v)
        if a.type[0] == "x":
            return f"0x{v:x}"
        return str(v)

    def _value(self, e: tuple, regs, entry: dict | None) -> int:
        k = e[0]
        if k == "reg":
            return regs.read(e[1])
        if k == "arg":
            return entry[e[1]] if entry is not None else regs.arg(e[1] - 1)
        if k == "stack":
            sp = regs.read("sp")
            return sp if e[1] is None else regs.read_word(sp + e[1] * self._word)
        if k == "retval":
            return regs_return_value(regs)
        # "mem" and "deref" as an operand: the machine word at the address
        raw = self._m.read_memory(self._address(e, regs, entry), self._word)
        return int.from_bytes(raw, self._endian)

    def _address(self, e: tuple, regs, entry: dict | None) -> int:
        if e[0] == "mem":
            return e[1]
        mask = (1 << (8 * self._word)) - 1
        return (self._value(e[2], regs, entry) + e[1]) & mask

    def _cstring(self, addr: int) -> str:
        out = bytearray()
        while len(out) < MAX_STRING_SIZE:
            b = self._m.read_memory(addr + len(out), 1)
            if b == b"\0":
                break
            out += b
        return out.decode("latin-1")


def _bool(path: str, text: str) -> bool:
    v = text.strip()
    if v in ("1", "0"):
        return v == "1"
    raise KprobeError(E.EINVAL, f"{path} takes 0 or 1, not {text!r}")


# == `smpkprobes trace`: a one-liner tracer ======================================================
# Default arguments of the workloads `--workload` knows by name; `n` is --loops.
WORKLOADS: dict[str, Callable[[int], tuple[int, ...]]] = {
    "fork_loop": lambda n: (n,),
    "open_loop": lambda n: (n, 3),
    "fib": lambda n: (10,),
    "sleepy": lambda n: (1,),
    "bench_loop": lambda n: (n,),
    "stacktrace_driver": lambda n: (),
    "kprobe_target": lambda n: (n,),
    "vfs_read": lambda n: (0, 0, n, 0),
    "tcp_v4_rcv": lambda n: (0,),
}


def parse_workloads(spec: str, loops: int) -> list[tuple[str, tuple[int, ...]]]:
    """`fork_loop,open_loop:10:2,fib:12`: guest functions, each with optional `:ARG`s;
    known workloads default their arguments from `loops`."""
    out = []
    for item in filter(None, (w.strip() for w in spec.split(","))):
        name, *args = item.split(":")
        try:
            values = tuple(int(a, 0) for a in args)
        except ValueError:
            raise ValueError(f"workload {item!r}: arguments must be integers") from None
        if not values and name in WORKLOADS:
            values = WORKLOADS[name](loops)
        out.append((name, values))
    return out


async def trace_session(definitions: list[str], workloads: list[tuple[str, tuple[int, ...]]], *,
                        arch: str = "x86_64", cpus: int = 4, seed: int = 1,
                        preempt: bool = False, out: Callable[[str], None] = print,
                        err: Callable[[str], None] = print, after=None) -> int:
    """Define the events, enable them, run every workload once on every CPU, and hand each
    trace line to `out` as it is recorded.  Returns a process exit status."""
    from .._system import Machine        # _system builds us: import it only when run
    async with Machine(arch=arch, cpus=cpus, seed=seed, preempt=preempt) as m:
        fs = m.tracefs
        missing = [name for name, _ in workloads if not m.kallsyms_lookup_name(name)]
        if missing:
            err(f"no such guest function: {', '.join(missing)}")
            return 2
        for d in definitions:       # a bad one raises KprobeError: the caller reports it
            await fs.write("kprobe_events", d, append=True)
        if not fs.events():
            err("no kprobe events defined")
            return 2
        fs.follow(out)
        await fs.write("events/enable", "1")
        async with trio.open_nursery() as n:
            for name, args in workloads:
                for cpu in range(cpus):
                    n.start_soon(functools.partial(m.call, name, *args, cpu=cpu))
        await fs.write("events/enable", "0")
        fs.unfollow(out)
        summary = ", ".join(f"{ev.group}/{ev.name} {ev.nhit} hits, {ev.nmissed} missed"
                            for ev in fs.events())
        err(f"# {len(fs._buffer)} lines; {summary}")
        await fs.write("kprobe_events", "")
    if after is not None:
        after(m)
    return 0

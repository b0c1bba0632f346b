"""The kprobe_events grammar (Documentation/trace/kprobetrace.rst), parsed in the order and
with the error positions of kernel/trace/trace_kprobe.c and trace_probe.c:

    p[:[GRP/|GRP.][EVENT]] [MOD:]SYM[+offs]|ADDR [FETCHARGS]     a probe
    p[:[GRP/][EVENT]] [MOD:]SYM[+0]%return [FETCHARGS]            a return probe
    r[MAXACTIVE][:[GRP/][EVENT]] [MOD:]SYM[+0] [FETCHARGS]        a return probe
    -:[GRP/][EVENT] [SYM [FETCHARGS]]                             delete (kprobe_events)

    FETCHARG  %REG  $stack  $stackN  $retval  $comm  $argN  @ADDR  @SYM[+|-offs]
              \\IMM  \\"STRING"  +|-[u]OFFS(FETCHARG)   and  [NAME=]FETCHARG[:TYPE]
    TYPE      u8..u64 s8..s64 x8..x64 char string ustring symbol symstr
              b<bit-width>@<bit-offset>/<container-size>  and any of them as TYPE[N]

A definition parses into a `Definition` whose fetch arguments are small trees (see `Arg`);
`_tp_fetch` evaluates them when the probe hits.  Numbers follow the kernel's kstrto*():
base 0 means 0x hex, a leading 0 octal, else decimal, and the whole word must be a number.
"""

from __future__ import annotations

import errno as E
import re

from ._tp_defs import (Arg, Definition, count_symbols, is_good_name, is_good_system_name,
                       kstrtoul, resolve_symbol, simple_strtoul)
from ._tp_errors import TraceProbeError
from ._tp_fetch import fetch_type

MAX_EVENT_NAME_LEN = 64
MAX_ARG_NAME_LEN = 32
MAX_ARGSTR_LEN = 63
MAX_TRACE_ARGS = 128
MAX_ARRAY_LEN = 64
FETCH_INSN_MAX = 16           # fetch + deref*N + store + modify + loop + end
KRETPROBE_MAXACTIVE_MAX = 4096
UINT_MAX = (1 << 32) - 1
DEFAULT_GROUP = "kprobes"
RESERVED_FIELD_NAMES = ("common_type", "common_flags", "common_preempt_count", "common_pid",
                        "common_tgid", "__probe_ip", "__probe_ret_ip", "__probe_func")


class Canceled(Exception):
    """Not a kprobe command (the kernel's -ECANCELED): EINVAL, nothing logged."""


# == the parser ==================================================================================
class Command:
    """One command split into words, with the kernel's error positions."""

    def __init__(self, words: list[str]):
        self.argv = words
        self.text = " ".join(words)
        self.starts, pos = [], 0
        for w in words:
            self.starts.append(pos)
            pos += len(w) + 1

    def error(self, code: str, index: int, offset: int = 0,
              errno: int | None = None) -> TraceProbeError:
        if index >= len(self.argv):
            pos = len(self.text) + 1            # "next to the last arg + space"
        else:
            pos = self.starts[index] + offset
        return TraceProbeError(code, self.text, pos, errno)

    def fail(self, code: str, index: int, offset: int = 0, errno: int | None = None):
        raise self.error(code, index, offset, errno)


class _Ctx:
    """traceprobe_parse_context: flags, the word being parsed and the offset in it."""

    def __init__(self, cmd: Command, is_return: bool, fentry: bool, max_stack: int,
                 register_name, default: str):
        self.cmd = cmd
        self.default = default                  # x64 or x32: unsigned long
        self.bits = int(default[1:])
        self.is_return, self.fentry = is_return, fentry
        self.max_stack = max_stack
        self.register_name = register_name
        self.index = 0
        self.offset = 0
        self.ops = 0             # fetch_insn slots used so far

    def fail(self, code: str, offset: int | None = None, errno: int | None = None):
        self.cmd.fail(code, self.index, self.offset if offset is None else offset, errno)

    def take_op(self) -> None:
        """`if (++code == end)`: one more fetch_insn, TOO_MANY_OPS past the 15th."""
        self.ops += 1
        if self.ops >= FETCH_INSN_MAX - 1:
            self.fail("TOO_MANY_OPS")


def parse_create(words: list[str], m, register_name, max_stack: int) -> Definition:
    """trace_kprobe_create_internal: a `p`/`r` command.  `m` resolves symbols."""
    cmd = Command(words)
    argv = cmd.argv
    if argv[0][0] not in "pr" or len(argv) < 2:
        raise Canceled()
    is_return = argv[0][0] == "r"
    colon = argv[0].find(":", 1)
    event = argv[0][colon + 1:] if colon >= 0 else None
    maxactive = 0
    if argv[0][1:2].isdigit():
        if not is_return:
            cmd.fail("BAD_MAXACT_TYPE", 0, 1)
        text = argv[0][1:colon] if colon >= 0 else argv[0][1:]
        n = kstrtoul(text, 0, 32) if len(text) <= MAX_EVENT_NAME_LEN - 1 else None
        if not n:
            cmd.fail("BAD_MAXACT", 0, 1)
        if n > KRETPROBE_MAXACTIVE_MAX:
            cmd.fail("MAXACT_TOO_BIG", 0, 1)
        maxactive = n

    symbol, offset, fentry = None, 0, False
    addr = kstrtoul(argv[1], 0, m.backend.bits)
    if addr is None:
        if "/" in argv[1] and ":" in argv[1]:
            raise Canceled()                    # a uprobe
        symbol = argv[1]
        pct = symbol.find("%")
        if pct >= 0:
            if symbol[pct:] != "%return":
                cmd.fail("BAD_ADDR_SUFFIX", 1, pct)
            symbol, is_return = symbol[:pct], True
        split = re.search(r"[+-]", symbol)
        if split:
            offset = kstrtoul(symbol[split.start():], 0, 64, signed=True)
            if offset is None or offset < 0 or offset > UINT_MAX:
                cmd.fail("BAD_PROBE_ADDR", 1)
            symbol = symbol[:split.start()]
        # validate_probe_symbol(): -EADDRNOTAVAIL for a name several symbols share, -ENOENT
        # for none (the error_log texts are NON_UNIQ_SYMBOL and BAD_PROBE_ADDR).
        count = count_symbols(m, symbol)
        if count > 1:
            cmd.fail("NON_UNIQ_SYMBOL", 1, errno=E.EADDRNOTAVAIL)
        if count == 0:
            cmd.fail("BAD_PROBE_ADDR", 1, errno=E.ENOENT)
        where = resolve_symbol(m, symbol)
        # kprobe_on_func_entry(): 0 at an entry, EINVAL elsewhere, ENOENT when not loaded.
        if where is not None:
            at_entry = offset == 0
            if at_entry and not is_return:
                fentry = True
            if not at_entry and is_return:
                cmd.fail("BAD_RETPROBE", 1)

    group = DEFAULT_GROUP
    if event is not None:
        group, event = _event_name(cmd, event, colon + 1, group)
    if event is None:
        where = f"{symbol}_{offset}" if symbol is not None else f"0x{addr:x}"
        event = re.sub(r"[:.*]", "_", f"{'r' if is_return else 'p'}_{where}")   # sanitize
        event = event[:MAX_EVENT_NAME_LEN - 1]

    # TPARG_FL_RETURN is set only for a symbol: an address return probe has neither it nor
    # FENTRY, so the kernel refuses $retval (RETVAL_ON_PROBE) and $argN there.
    ctx = _Ctx(cmd, is_return and symbol is not None, fentry, max_stack, register_name,
               f"x{m.backend.bits}")
    _check_meta_args(ctx, argv[2:])
    if len(argv) - 2 > MAX_TRACE_ARGS:
        cmd.fail("TOO_MANY_ARGS", 2)
    d = Definition(is_return, group, event, symbol, offset, addr, maxactive)
    for i, word in enumerate(argv[2:]):
        ctx.index, ctx.offset, ctx.ops = i + 2, 0, 0
        d.args.append(_parse_arg(ctx, word, i, d.args))
    return d


def _event_name(cmd: Command, text: str, offset: int, group: str) -> tuple[str, str | None]:
    """traceprobe_parse_event_name: `[GRP/|GRP.][EVENT]`."""
    slash = text.find("/")
    if slash < 0:
        slash = text.find(".")
    if slash >= 0:
        if slash == 0:
            cmd.fail("NO_GROUP_NAME", 0, offset)
        if slash + 1 > MAX_EVENT_NAME_LEN:
            cmd.fail("GROUP_TOO_LONG", 0, offset)
        if not is_good_system_name(text[:slash]):
            cmd.fail("BAD_GROUP_NAME", 0, offset)
        group, text, offset = text[:slash], text[slash + 1:], offset + slash + 1
    if not text:
        if slash >= 0:
            return group, None
        cmd.fail("NO_EVENT_NAME", 0, offset)
    if len(text) >= MAX_EVENT_NAME_LEN:
        cmd.fail("EVENT_TOO_LONG", 0, offset)
    if not is_good_name(text):
        cmd.fail("BAD_EVENT_NAME", 0, offset)
    return group, text


def _check_meta_args(ctx: _Ctx, args: list[str]) -> None:
    """traceprobe_expand_meta_args without BTF: $arg words need a function entry or exit,
    and `$arg*` needs BTF, which this kernel does not have."""
    star = False
    for i, a in enumerate(args):
        if not a.startswith("$arg"):
            continue
        ctx.index = i + 2
        if not (ctx.fentry or ctx.is_return):
            ctx.fail("NOFENTRY_ARGS", 0)
        if a[4:5].isdigit():
            continue
        if a[4:5] != "*":
            ctx.fail("BAD_VAR", 0)
        if star:
            ctx.fail("DOUBLE_ARGS", 0)
        star = True
    if star:
        ctx.fail("NOSUP_BTFARG", 0)


def _parse_arg(ctx: _Ctx, word: str, i: int, previous: list[Arg]) -> Arg:
    """traceprobe_parse_probe_arg: `[NAME=]BODY`."""
    eq = word.find("=")
    if eq >= 0:
        if eq > MAX_ARG_NAME_LEN:
            ctx.fail("ARG_NAME_TOO_LONG", 0)
        if eq == 0:
            ctx.fail("NO_ARG_NAME", 0)
        name, body = word[:eq], word[eq + 1:]
    else:
        name, body = f"arg{i + 1}", word
    if not is_good_name(name):
        ctx.fail("BAD_ARG_NAME", 0)
    if name in RESERVED_FIELD_NAMES or any(a.name == name for a in previous):
        ctx.fail("USED_ARG_NAME", 0)
    ctx.offset = eq + 1
    return _parse_body(ctx, name, body)


def _parse_body(ctx: _Ctx, name: str, arg: str) -> Arg:
    """traceprobe_parse_probe_arg_body: length, `:TYPE[N]`, the expression, the store."""
    if len(arg) > MAX_ARGSTR_LEN:
        ctx.fail("ARG_TOO_LONG", errno=E.E2BIG)
    if not arg:
        ctx.fail("NO_ARG_BODY")
    comm = arg
    typ, count, toffs = None, 0, 0
    colon = arg.find(":")
    if colon >= 0:
        arg, typ, toffs = arg[:colon], arg[colon + 1:], colon + 1
        lb = typ.find("[")
        if lb >= 0:
            inner = typ[lb + 1:]
            rb = inner.find("]")
            if rb < 0:
                ctx.fail("ARRAY_NO_CLOSE", ctx.offset + toffs + lb + 1 + len(inner))
            if inner[rb + 1:]:
                ctx.fail("BAD_ARRAY_SUFFIX", ctx.offset + toffs + lb + 1 + rb + 1)
            count = kstrtoul(inner[:rb], 0, 32)
            if not count:
                ctx.fail("BAD_ARRAY_NUM", ctx.offset + toffs + lb + 1)
            if count > MAX_ARRAY_LEN:
                ctx.fail("ARRAY_TOO_BIG", ctx.offset + toffs + lb + 1)
            typ = typ[:lb]
    if arg in ("$comm", "$COMM") or arg.startswith('\\"'):
        if count or (typ is not None and typ != "string"):
            ctx.fail("NEED_STRING_TYPE", ctx.offset + toffs)
        base = "string"
    else:
        base = fetch_type(typ)
        base = ctx.default if base == "xlong" else base
    if base is None:
        ctx.fail("BAD_TYPE", ctx.offset + toffs)
    code = _parse_expr(ctx, arg)
    bitfield = _finalize(ctx, code, base, typ, toffs, count)
    return Arg(name, comm, code, base, bitfield, count)


def _parse_expr(ctx: _Ctx, arg: str) -> tuple:
    """parse_probe_arg, recursive for dereferences."""
    c = arg[:1]
    if c == "$":
        return _parse_var(ctx, arg[1:])
    if c == "%":
        reg = ctx.register_name(arg[1:])
        if reg is None:
            ctx.fail("BAD_REG_NAME")
        return ("reg", reg)
    if c == "@":
        if arg[1:2].isdigit():
            addr = kstrtoul(arg[1:], 0, ctx.bits)
            if addr is None:
                ctx.fail("BAD_MEM_ADDR")
            base = ("imm", addr)
        elif arg[1:2] == "+":
            ctx.fail("FILE_ON_KPROBE")
        else:
            ctx.take_op()                       # FETCH_NOP_SYMBOL, then the immediate
            base = ("sym", arg[1:])
        ctx.take_op()
        return ("deref", 0, base, False)
    if c in ("+", "-"):
        user = arg[1:2] == "u"
        s = arg[0] + arg[2:] if user else arg
        if s[0] == "+":
            s = s[1:]
        paren = s.find("(")
        if paren < 0:
            ctx.fail("DEREF_NEED_BRACE")
        offs = kstrtoul(s[:paren], 0, ctx.bits, signed=True)
        if offs is None:
            ctx.fail("BAD_DEREF_OFFS")
        ctx.offset += paren + 1 + (1 if s[0] != "-" else 0)
        s = s[paren + 1:]
        close = s.rfind(")")
        if close < 0:
            ctx.fail("DEREF_OPEN_BRACE", ctx.offset + len(s))
        cur = ctx.offset
        inner = _parse_expr(ctx, s[:close])
        ctx.offset = cur
        if inner[0] in ("comm", "data"):
            ctx.fail("COMM_CANT_DEREF")
        ctx.take_op()
        return ("deref", offs, inner, user)
    if c == "\\":
        if arg[1:2] == '"':
            text = arg[2:]
            if text and text[-1] != '"':
                ctx.fail("IMMSTR_NO_CLOSE", ctx.offset + 2 + len(text))
            return ("data", text[:-1])
        s = arg[1:]
        if s[:1].isdigit():
            v = kstrtoul(s, 0, ctx.bits)
        elif s[:1] == "-":
            v = kstrtoul(s, 0, ctx.bits, signed=True)
        elif s[:1] == "+":
            v = kstrtoul(s[1:], 0, ctx.bits, signed=True)
        else:
            v = None
        if v is None:
            ctx.fail("BAD_IMM", ctx.offset + 1)
        return ("imm", v)
    if c.isalpha() or c == "_":
        ctx.fail("NOSUP_BTFARG", errno=E.EOPNOTSUPP if ctx.fentry or ctx.is_return
                 else E.EINVAL)                 # a BTF variable: no BTF here
    ctx.fail("BAD_FETCH_ARG")


def _parse_var(ctx: _Ctx, var: str) -> tuple:
    """parse_probe_vars: $retval $stack $stackN $comm $argN."""
    if var.startswith("retval"):
        if not ctx.is_return:
            ctx.fail("RETVAL_ON_PROBE")
        return ("retval",)
    if var.startswith("stack"):
        n = var[5:]
        if not n:
            return ("stackp",)
        if n[0].isdigit():
            v = kstrtoul(n, 10, 64)
            if v is None:
                ctx.fail("BAD_VAR")
            if v > ctx.max_stack:
                ctx.fail("BAD_STACK_NUM")
            return ("stack", v)
        ctx.fail("BAD_VAR")
    if var in ("comm", "COMM"):
        return ("comm",)
    if var.startswith("arg"):
        v = kstrtoul(var[3:], 10, 64)
        if v is None:
            ctx.fail("BAD_VAR")
        if not v or v > ctx.max_stack:
            ctx.fail("BAD_ARG_NUM")
        if not (ctx.fentry or ctx.is_return):
            ctx.fail("NOFENTRY_ARGS")
        return ("arg", v - 1)
    ctx.fail("BAD_VAR")


def _finalize(ctx: _Ctx, code: tuple, base: str, typ: str | None, toffs: int,
              count: int) -> tuple[int, int, int] | None:
    """finalize_fetch_insn: the store op fits the expression, then bitfield and array."""
    op = code[0]
    where = ctx.offset + toffs
    if base in ("string", "ustring", "symstr"):
        if base == "symstr":
            if op not in ("reg", "stack", "retval", "arg", "deref"):
                ctx.fail("BAD_SYMSTRING", where)
        elif op not in ("deref", "imm", "comm", "data"):
            ctx.fail("BAD_STRING", where)
        if base == "symstr" or op in ("imm", "comm", "data") or count:
            ctx.take_op()
        memory = op == "deref"
    elif op == "deref":
        memory = True                           # the dereference becomes the store
    else:
        ctx.take_op()
        memory = False
    bitfield = None
    if typ is not None and typ[:1] == "b":
        bitfield = _bitfield(typ)
        if bitfield is None:
            ctx.fail("BAD_BITFIELD", where)
        ctx.ops += 1
        if ctx.ops >= FETCH_INSN_MAX - 1:
            ctx.fail("BAD_BITFIELD", where)
    if count:
        if not memory:
            ctx.fail("BAD_STRING", where)
        ctx.take_op()
    return bitfield


def _bitfield(typ: str) -> tuple[int, int, int] | None:
    """b<bit-width>@<bit-offset>/<container-size>, the container 8, 16, 32 or 64 bits."""
    width, tail = simple_strtoul(typ[1:])
    if width == 0 or tail[:1] != "@":
        return None
    offset, rest = simple_strtoul(tail[1:])
    if rest == tail[1:] or rest[:1] != "/":
        return None
    bits = kstrtoul(rest[1:], 0, 64)
    if bits not in (8, 16, 32, 64) or bits < width + offset:
        return None
    return width, offset, bits

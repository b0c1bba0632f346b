"""What a kprobe_events definition parses into (`Definition`, `Arg`), and the kernel's
number and name rules the parser uses: kstrtoul/kstrtol, simple_strtoul, is_good_name,
and kallsyms lookups of `[MOD:]SYM`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_GOOD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_GOOD_SYSTEM = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


# == kstrto*() ==================================================================================
def kstrtoul(s: str, base: int = 0, bits: int = 64, signed: bool = False) -> int | None:
    """The kernel's kstrtoul/kstrtol: the whole string (one trailing newline allowed) is a
    number in `base` (0: 0x hex, leading 0 octal, else decimal), within `bits`."""
    neg = False
    if signed and s[:1] == "-":
        neg, s = True, s[1:]
    elif s[:1] == "+":
        s = s[1:]
    s = s[:-1] if s.endswith("\n") else s
    if base == 0:
        if s[:1] == "0":
            base = 16 if s[1:2] in ("x", "X") and s[2:3] and _is_digits(s[2:3], 16) else 8
        else:
            base = 10
        if base == 16:
            s = s[2:]
    elif base == 16 and s[:2].lower() == "0x":
        s = s[2:]
    if not s or not _is_digits(s, base):
        return None
    v = int(s, base)
    limit = 1 << (bits - 1) if signed else 1 << bits
    if v >= limit + (1 if neg else 0):
        return None
    return -v if neg else v


def _is_digits(s: str, base: int) -> bool:
    return all(c in "0123456789abcdefghijklmnopqrstuvwxyz"[:base] for c in s.lower())


def simple_strtoul(s: str) -> tuple[int, str]:
    """simple_strtoul(s, &tail, 0): the longest number at the start of `s`, and the rest."""
    base, i = 10, 0
    if s[:1] == "0":
        base, i = (16, 2) if s[1:2] in ("x", "X") and _is_digits(s[2:3], 16) and s[2:3] \
            else (8, 0)
    j = i
    while j < len(s) and _is_digits(s[j], base):
        j += 1
    return (int(s[i:j], base), s[j:]) if j > i else (0, s)


def is_good_name(name: str) -> bool:
    """A C identifier: event and argument names."""
    return bool(_GOOD_NAME.match(name))


def is_good_system_name(name: str) -> bool:
    """A group (system) name: a C identifier that may also hold '-'."""
    return bool(_GOOD_SYSTEM.match(name))


# == what a definition parses into ==============================================================
@dataclass(frozen=True)
class Arg:
    """One fetch argument.  `code` is a tree: ("reg", name) ("stack", n) ("stackp",)
    ("retval",) ("comm",) ("arg", n) (0-based; from the entry for a return probe)
    ("imm", value) ("data", text) ("sym", "SYM+off") ("deref", offs, inner, user).
    As the outermost node, "deref" means the bytes at inner+offs; inside, the word there."""

    name: str
    comm: str              # the expression as written after NAME=, type included
    code: tuple
    type: str              # u8..x64 char symbol string ustring symstr
    bitfield: tuple[int, int, int] | None = None      # (width, offset, container bits)
    count: int = 0         # array length, 0 for a scalar

    def same_type(self, other: "Arg") -> bool:
        return (self.type, self.count, self.name) == (other.type, other.count, other.name)


@dataclass
class Definition:
    is_return: bool
    group: str
    event: str
    symbol: str | None     # as written, module prefix included; None for an address
    offset: int
    addr: int | None
    maxactive: int
    args: list[Arg] = field(default_factory=list)

    @property
    def module(self) -> str | None:
        return self.symbol.split(":", 1)[0] if self.symbol and ":" in self.symbol else None

    def place(self) -> str:
        """The probe point as kprobe_events lists it (trace_kprobe_show)."""
        if self.symbol is None:
            return f"0x{self.addr:x}"
        return f"{self.symbol}+{self.offset}" if self.offset else self.symbol

    def line(self) -> str:
        head = ("r" + (str(self.maxactive) if self.maxactive else "")) if self.is_return else "p"
        return (f"{head}:{self.group}/{self.event} {self.place()}"
                + "".join(f" {a.name}={a.comm}" for a in self.args))

    def matches(self, words: list[str]) -> bool:
        """trace_kprobe_match_command_head: `SYM[+offs] [NAME=ARG...]` of a delete command."""
        if not words:
            return True
        if words[0] != self.place() or len(words) - 1 > len(self.args):
            return False
        return all(w == f"{a.name}={a.comm}" for w, a in zip(words[1:], self.args))


def _symbols(m) -> list:
    """Every kallsyms entry, kernel and modules (the kernel's kallsyms_on_each_symbol)."""
    return m.kallsyms._syms


def count_symbols(m, symbol: str) -> int:
    """number_of_same_symbols, after validate_probe_symbol's MOD: handling: a module that
    is not loaded counts as one (the probe waits for it)."""
    mod, _, name = symbol.rpartition(":")
    if mod:
        if mod not in m.modules:
            return 1
        return sum(1 for s in _symbols(m) if s.name == name and s.module == mod)
    return sum(1 for s in _symbols(m) if s.name == name)


def resolve_symbol(m, symbol: str) -> int | None:
    """kallsyms_lookup_name("[MOD:]SYM"): the address, or None."""
    mod, _, name = symbol.rpartition(":")
    for s in _symbols(m):
        if s.name == name and (not mod or s.module == mod):
            return s.addr
    return None

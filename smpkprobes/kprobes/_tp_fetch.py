"""Fetch-argument types and their evaluation in the probe handler (trace_probe.c's
probe_fetch_types and process_fetch_insn, trace_probe_tmpl.h).

Types print as the kernel's print functions do: u* %u, s* %d, x* 0x%x, char '%c', symbol
%pS, the string types "..." or (fault), a bitfield as its unsigned container, an array
{a,b,c}.  `ustring` and `+u` dereferences read user memory; this machine has one address
space, so they read the same memory as `string` and `+` (the kernel's user/kernel split,
where a user read of a kernel address faults, is not modelled).
"""

from __future__ import annotations

MAX_STRING_SIZE = 4096         # PATH_MAX
FAULT = "(fault)"

_SCALARS = {f"{k}{n}" for k in "usx" for n in (8, 16, 32, 64)}
STRING_TYPES = ("string", "ustring", "symstr")


def fetch_type(typ: str | None, word_bits: int = 0) -> str | None:
    """find_fetch_type: the base type of `typ` (None: the default), or None if unknown.
    A bitfield `b..../N` is stored in uN."""
    if typ is None:
        return "xlong"
    if typ[:1] == "b":
        slash = typ.find("/")
        return {"8": "u8", "16": "u16", "32": "u32", "64": "u64"}.get(typ[slash + 1:]) \
            if slash >= 0 else None
    if typ in _SCALARS or typ in ("char", "symbol") or typ in STRING_TYPES:
        return typ
    return None


class Fetcher:
    """Evaluates `Arg`s on one machine: registers through `regs`, memory through `m`."""

    def __init__(self, m):
        self.m = m
        b = m.backend
        self.word, self.endian = b.word_bytes, b.endian
        self.mask = (1 << (8 * self.word)) - 1
        self.default = f"x{b.bits}"
        self.symbols: dict[str, int] = {}       # @SYM+off, resolved at registration

    def type_of(self, arg) -> str:
        return self.default if arg.type == "xlong" else arg.type

    # -- values --------------------------------------------------------------------------------
    def value(self, e: tuple, regs, entry: dict | None) -> int:
        """The machine word an expression stands for (an address, for a final deref)."""
        k = e[0]
        if k == "reg":
            return regs.read(e[1])
        if k == "arg":
            return entry[e[1]] if entry is not None else regs.arg(e[1])
        if k == "stackp":
            return regs.read("sp")
        if k == "stack":
            return regs.read_word(regs.read("sp") + e[1] * self.word)
        if k == "retval":
            from ._core import regs_return_value
            return regs_return_value(regs)
        if k == "imm":
            return e[1] & self.mask
        if k == "sym":
            return self.symbols[e[1]]
        # a dereference inside another: the word at inner + offs
        return self.word_at(self.address(e, regs, entry))

    def address(self, e: tuple, regs, entry: dict | None) -> int:
        return (self.value(e[2], regs, entry) + e[1]) & self.mask

    def word_at(self, addr: int) -> int:
        return int.from_bytes(self.m.read_memory(addr, self.word), self.endian)

    def cstring(self, addr: int) -> str:
        out = bytearray()
        while len(out) < MAX_STRING_SIZE - 1:
            b = self.m.read_memory(addr + len(out), 1)
            if b == b"\0":
                break
            out += b
        return out.decode("latin-1")

    # -- one argument, formatted -------------------------------------------------------------
    def format(self, arg, regs, entry: dict | None, comm: str) -> str:
        typ = self.type_of(arg)
        e = arg.code
        if typ in STRING_TYPES:
            if not arg.count:
                return self._string(typ, e, regs, entry, comm, None)
            # an array of string pointers at the address the last dereference reads
            base = self.address(e, regs, entry) if e[0] == "deref" else self.value(e, regs,
                                                                                   entry)
            return "{" + ",".join(self._string(typ, e, regs, entry, comm,
                                               base + i * self.word)
                                  for i in range(arg.count)) + "}"
        size = _size(typ, self.word)
        try:
            if e[0] == "deref":
                addr = self.address(e, regs, entry)
                vals = [int.from_bytes(self.m.read_memory(addr + i * size, size), self.endian)
                        for i in range(max(arg.count, 1))]
            else:
                vals = [self.value(e, regs, entry) & ((1 << (8 * size)) - 1)]
        except (ValueError, OSError):          # an unmapped guest address
            return FAULT
        out = [self._scalar(typ, v, size, arg.bitfield) for v in vals]
        return "{" + ",".join(out) + "}" if arg.count else out[0]

    def _string(self, typ, e, regs, entry, comm: str, pointer_at: int | None) -> str:
        try:
            if e[0] == "comm":
                return f'"{comm}"'
            if e[0] == "data":
                return f'"{e[1]}"'
            if typ == "symstr":
                return f'"{self.symbol(self.value(e, regs, entry))}"'
            if pointer_at is not None:
                addr = self.word_at(pointer_at)
            elif e[0] == "deref":
                addr = self.address(e, regs, entry)
            else:
                addr = self.value(e, regs, entry)
            return '"' + self.cstring(addr) + '"'
        except (ValueError, OSError):
            return FAULT

    def _scalar(self, typ: str, v: int, size: int, bitfield) -> str:
        bits = 8 * size
        if bitfield is not None:
            width, offset, _ = bitfield
            return str((v >> offset) & ((1 << width) - 1))
        if typ[0] == "s":
            return str(v - (1 << bits) if v >> (bits - 1) else v)
        if typ[0] == "x":
            return f"0x{v:x}"
        if typ == "char":
            return f"'{chr(v)}'"
        if typ == "symbol":
            return self.symbol(v)
        return str(v)

    def symbol(self, addr: int) -> str:
        """%pS: `sym+0xoff/0xsize [module]`, or the bare address."""
        s = self.m.kallsyms.containing(addr)
        if s is None:
            return f"0x{addr:x}"
        text = f"{s.name}+{addr - s.addr:#x}/{s.size:#x}"
        return text + (f" [{s.module}]" if s.module else "")


def _size(typ: str, word: int) -> int:
    if typ in ("char",):
        return 1
    if typ == "symbol":
        return word
    return int(typ[1:]) // 8

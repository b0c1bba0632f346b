"""Kernel and module images: ELF loading and kallsyms.

The default kernel is C compiled per architecture by clang (smpkprobes/machine/kernel/build.py) and
committed as ELF images.  pyelftools reads them: PT_LOAD segments go into physical memory,
the symbol table becomes kallsyms (name, address, size).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile

IMAGES = Path(__file__).parent / "kernel" / "images"


@dataclass(frozen=True)
class Symbol:
    name: str
    addr: int
    size: int
    module: str | None = None
    is_func: bool = True


@dataclass
class Image:
    """One loaded ELF: its segments and symbols."""

    path: Path
    segments: list[tuple[int, bytes, int]]          # (addr, data, memsz)
    symbols: list[Symbol]
    sections: dict[str, tuple[int, int]] = field(default_factory=dict)   # name -> (addr, size)

    @classmethod
    def load(cls, path: Path, module: str | None = None) -> "Image":
        with open(path, "rb") as f:
            elf = ELFFile(f)
            segments = [(seg["p_vaddr"], seg.data(), seg["p_memsz"])
                        for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
            sections = {s.name: (s["sh_addr"], s["sh_size"]) for s in elf.iter_sections()
                        if s["sh_addr"]}
            symbols = []
            symtab = elf.get_section_by_name(".symtab")
            for sym in symtab.iter_symbols() if symtab is not None else ():
                kind = sym["st_info"]["type"]
                if not sym.name or kind in ("STT_FILE", "STT_SECTION") or sym["st_shndx"] == "SHN_UNDEF":
                    continue
                if sym["st_shndx"] == "SHN_ABS" and module is not None:
                    continue      # --just-symbols copies of the kernel's symbols
                symbols.append(Symbol(sym.name, sym["st_value"], sym["st_size"], module,
                                      kind == "STT_FUNC"))
        return cls(Path(path), segments, symbols, sections)


class Kallsyms:
    """Name <-> address, for the kernel and loaded modules; deterministic ordering."""

    def __init__(self):
        self._by_name: dict[str, Symbol] = {}
        self._starts: list[int] = []
        self._syms: list[Symbol] = []

    def add(self, symbols: list[Symbol]) -> None:
        for s in symbols:
            # Global symbols win over local labels of the same name; first one otherwise.
            self._by_name.setdefault(s.name, s)
        self._rebuild([*self._syms, *symbols])

    def remove_module(self, module: str) -> None:
        self._by_name = {n: s for n, s in self._by_name.items() if s.module != module}
        self._rebuild([s for s in self._syms if s.module != module])

    def _rebuild(self, syms: list[Symbol]) -> None:
        # Sort by address; at equal addresses prefer sized symbols then names, so that
        # symbolize() is stable.
        self._syms = sorted(syms, key=lambda s: (s.addr, s.size == 0, s.name))
        self._starts = [s.addr for s in self._syms]

    def lookup(self, name: str) -> Symbol | None:
        return self._by_name.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def containing(self, addr: int) -> Symbol | None:
        """The sized symbol whose [addr, addr+size) holds addr.  Unsized labels (_text,
        __hypercall_start, ...) are used only when they sit exactly at addr."""
        i = bisect.bisect_right(self._starts, addr) - 1
        label = None
        while i >= 0:
            s = self._syms[i]
            if s.size:
                return s if addr < s.addr + s.size else label
            if s.addr == addr and label is None:
                label = s
            i -= 1
        return label

    def symbolize(self, addr: int) -> tuple[str, int, str | None] | None:
        s = self.containing(addr)
        if s is None:
            return None
        return s.name, addr - s.addr, s.module

    def functions(self) -> list[Symbol]:
        return [s for s in self._syms if s.is_func and s.size]

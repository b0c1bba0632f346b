"""The debugfs view: kprobes/list, kprobes/enabled, kprobes/blacklist (KPROBES.md section 6)."""

from __future__ import annotations

import errno as E

from .._errors import KprobeError
from ..machine._services import KernelServices
from ._core import KprobesSubsystem


class Debugfs:
    def __init__(self, kernel: KernelServices, kprobes: KprobesSubsystem):
        self._kernel = kernel
        self._k = kprobes
        self._w = kernel.backend.bits // 4
        # More read-only files, path -> function giving the text (hw_breakpoint/list).
        self.files: dict = {}

    def read(self, path: str) -> str:
        if path == "kprobes/list":
            return self._list()
        if path == "kprobes/enabled":
            return "1\n" if self._k.enabled else "0\n"
        if path == "kprobes/blacklist":
            return "".join(f"0x{a:0{self._w}x}-0x{b:0{self._w}x}\t{name}\n"
                           for a, b, name in self._k.blacklist())
        if path in self.files:
            return self.files[path]()
        raise KprobeError(E.ENOENT, f"no debugfs file {path!r}")

    async def write(self, path: str, value: str) -> None:
        if path != "kprobes/enabled":
            raise KprobeError(E.EACCES if path in ("kprobes/list", "kprobes/blacklist") else E.ENOENT,
                              f"cannot write {path!r}")
        v = value.strip()
        if v in ("1", "y", "Y"):
            await self._k.set_enabled(True)
        elif v in ("0", "n", "N"):
            await self._k.set_enabled(False)
        else:
            raise KprobeError(E.EINVAL, f"kprobes/enabled takes 1/y/Y or 0/n/N, not {value!r}")

    def _list(self) -> str:
        lines = []
        for addr, p in self._k.probes():
            sym = getattr(p, "_where", None) or self._kernel.symbolize(addr)
            name, off, module = sym if sym is not None else ("?", 0, None)
            line = f"{addr:0{self._w}x}  {p._type}  {name}+{off:#x}"
            if module:
                line += f"  [{module}]"
            flags = []
            if p.gone:
                flags.append("[GONE]")
            if p.disabled:
                flags.append("[DISABLED]")
            if self._k.optimizer.is_optimized(addr):
                flags.append("[OPTIMIZED]")
            if flags:
                line += " " + "".join(flags)
            lines.append(line + "\n")
        return "".join(lines)

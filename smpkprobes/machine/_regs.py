"""`regs`: a lazy view of a trapped CPU's registers (the kernel's `struct pt_regs`).

Reading a register costs a call into Unicorn, so nothing is read until a handler asks, and
each register is read at most once per trap.  Writes are kept in the view and written back
in one go when the CPU resumes (`flush`).

A view is made on every probe hit, and most hits never read a register, so it is cheap
to make: one class per architecture (`regs_class`) carries a property for each register and
alias (`regs.rax`, `regs.ip`), the view itself is four slots with no `__setattr__` in the
way, and its cache is made on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:   # pragma: no cover
    from ._cpu import CPU


class Regs:
    """The architecture-independent part; `regs_class(backend)` adds the registers."""

    __slots__ = ("cpu", "_pc", "_cache", "_dirty")

    def __init__(self, cpu: "CPU", pc: int | None = None):
        self.cpu = cpu
        self._pc = pc           # the PC when the probe core knows it (not dirty)
        self._cache = None      # register name -> value, made on first use
        self._dirty = None      # a set, made on the first write

    def _regs(self) -> dict:
        cache = self._cache
        if cache is None:
            cache = self._cache = {} if self._pc is None else \
                {self.cpu.backend.cc.pc_reg: self._pc}
        return cache

    # -- the RegAccess protocol used by calling conventions and simulations -------------
    def read(self, name: str) -> int:
        cpu = self.cpu
        name = cpu.reg_aliases.get(name, name)
        cache = self._cache
        if cache is None:
            pc = self._pc
            cache = self._cache = {} if pc is None else {cpu.backend.cc.pc_reg: pc}
        v = cache.get(name)         # (a register's value is an int, never None)
        if v is None:
            if name not in cpu.backend.registers:
                raise AttributeError(f"no register {name!r} on {cpu.backend.name}")
            v = cache[name] = cpu.reg_read(name)
        return v

    def write(self, name: str, value: int) -> None:
        cpu = self.cpu
        name = cpu.reg_aliases.get(name, name)
        backend = cpu.backend
        if name not in backend.registers:
            raise AttributeError(f"no register {name!r} on {backend.name}")
        cache = self._cache
        if cache is None:
            cache = self._regs()
        cache[name] = value & backend.word_mask
        dirty = self._dirty
        if dirty is None:
            dirty = self._dirty = set()
        dirty.add(name)

    def read_word(self, addr: int) -> int:
        return self.cpu.read_word(addr)

    def write_word(self, addr: int, value: int) -> None:
        self.cpu.write_word(addr, value)

    # -- the public face --------------------------------------------------------------
    # Registers are properties of the per-arch class (regs_class); a name that is none is an
    # AttributeError naming the class (Regs_<arch>).  There is deliberately no __getattr__
    # to word it better: a class with one never has its attribute loads specialised by
    # CPython 3.11, and the hit path reads this view's slots a dozen times per hit.

    def __getitem__(self, name: str) -> int:
        return self.read(name)

    def __setitem__(self, name: str, value: int) -> None:
        self.write(name, value)

    def arg(self, n: int) -> int:
        """The n-th argument (from 0) by the calling convention, valid at function entry."""
        return self.cpu.backend.cc.arg(self, n)

    def set_arg(self, n: int, value: int) -> None:
        self.cpu.backend.cc.set_arg(self, n, value)

    def stack_trace(self) -> list[int]:
        """regs.ip, then the return addresses of the enclosing frames, innermost first.
        Return addresses redirected to the kretprobe trampoline are shown as the real ones."""
        return self.cpu.stack_trace(self)

    def flush_except_pc(self) -> None:
        """Write back every dirty register but the PC, which the caller sets itself (a PC
        write inside a Unicorn hook forces a translation-block exit: do it once)."""
        if self._dirty:
            self._dirty.discard(self.cpu.backend.cc.pc_reg)
            self.flush()

    def flush(self) -> None:
        if self._dirty:
            for name in self._dirty:
                self.cpu.reg_write(name, self._cache[name])
            self._dirty.clear()

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v:#x}" for k, v in sorted(self._regs().items()))
        return f"<regs cpu={self.cpu.id} {shown}>"


def _register(name: str) -> property:
    def get(self) -> int:
        cache = self._cache
        if cache is not None:
            v = cache.get(name)
            if v is not None:
                return v
        return self.read(name)

    def set(self, value: int) -> None:
        self.write(name, value)
    return property(get, set, doc=f"register {name}")


_classes: dict[str, type[Regs]] = {}


def regs_class(backend) -> type[Regs]:
    """The `Regs` of one architecture: a property per register, and per alias (ip, sp,
    flags) bound to the register it stands for."""
    cls = _classes.get(backend.name)
    if cls is None:
        aliases = {"ip": backend.cc.pc_reg, "sp": backend.cc.sp_reg, "flags": backend.flags_reg}
        attrs = {"__slots__": ()}
        for name in (*backend.registers, *aliases):
            if not hasattr(Regs, name):        # a method's name stays the method
                attrs[name] = _register(aliases.get(name, name))
        cls = _classes[backend.name] = type(f"Regs_{backend.name}", (Regs,), attrs)
        cls.__qualname__ = cls.__name__
    return cls

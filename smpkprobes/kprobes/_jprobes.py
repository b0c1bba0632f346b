"""Jprobes: setjmp_pre_handler sends the CPU to the handler, longjmp_break_handler
(jprobe_return() trapped) restores registers and stack.  A mixin of `KprobesSubsystem`."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Callable

from ..machine._regs import Regs
from ._probes import Jprobe, Kprobe, _JprobeReturn
from ._state import KprobeCtlblk

if TYPE_CHECKING:    # pragma: no cover
    from ..machine._cpu import CPU

MAX_STACK_SIZE = 64


class Jprobes:
    """The jprobe part of `KprobesSubsystem` (see `_core`)."""

    async def _register_jprobe(self, jp: Jprobe) -> None:
        jp.kp.pre_handler = self._setjmp_pre_handler
        await self._register(jp.kp)

    def _setjmp_pre_handler(self, p: Kprobe, regs: Regs) -> int:
        jp: Jprobe = p._owner
        cpu = regs.cpu
        kcb: KprobeCtlblk = cpu.kprobe_ctlblk
        cc = self._backend.cc
        regs.flush()
        sp, size = cc.stack_window(regs, MAX_STACK_SIZE)
        task = cpu.current
        size = min(size, task.stack_top - sp) if task is not None else size
        stack = self._m.memory.peek(sp, max(0, size))
        if callable(jp.entry) and not isinstance(jp.entry, (int, str)):
            # A Python entry gets copies of the arguments and no regs, so only the stack
            # (reachable through guest memory) needs saving: no CPU context round trip.
            nargs = jp.__dict__.get("_nargs")
            if nargs is None:
                nargs = jp._nargs = _arity(jp.entry, cc.default_arg_count)
            args = [cc.arg(regs, i) for i in range(nargs)]
            try:
                jp.entry(*args)
            except _JprobeReturn:
                pass
            else:
                name = getattr(jp.entry, "__qualname__", None) or repr(jp.entry)
                raise RuntimeError(f"jprobe handler {name} returned without calling "
                                   f"jprobe_return()")
            finally:
                self._m.memory.poke(sp, stack)
            return 0
        kcb.jprobe_saved = (cpu.context_save(), sp, stack)
        regs.write("ip", self._m.resolve_function(jp.entry))
        return 1

    def _longjmp(self, cpu: "CPU", kcb: KprobeCtlblk) -> None:
        """jprobe_return() trapped: restore registers and stack, then single-step the
        probed instruction."""
        ctx, sp, stack = kcb.jprobe_saved
        kcb.jprobe_saved = None
        cpu.context_restore(ctx)
        self._m.memory.poke(sp, stack)
        site = kcb.current
        regs = self._Regs(cpu, site.addr)
        pc = self._prepare_singlestep(cpu, kcb, site, regs)
        if pc is not None:
            cpu.pc = pc


def _arity(fn: Callable, default: int) -> int:
    """How many arguments `fn` takes; `default` (the calling convention's
    default_arg_count) more for *args, or in all when its signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return default
    n = 0
    for prm in params:
        if prm.kind is prm.VAR_POSITIONAL:
            return n + default
        if prm.kind in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD):
            n += 1
    return n

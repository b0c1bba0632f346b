"""Jprobes: setjmp_pre_handler sends the CPU to the handler, longjmp_break_handler
(jprobe_return() trapped) restores registers and stack.  A mixin of `KprobesSubsystem`."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Callable

from ._probes import Jprobe, Kprobe, _JprobeReturn
from ..machine._services import Regs, TrapResult
from ._state import KprobeCtlblk

if TYPE_CHECKING:    # pragma: no cover
    from ..machine._cpu import CPU

MAX_STACK_SIZE = 64


class Jprobes:
    """The jprobe part of `KprobesSubsystem` (see `_core`)."""

    async def _register_jprobe(self, jp: Jprobe) -> None:
        jp.kp.pre_handler = self.setjmp_pre_handler
        await self._register(jp.kp)

    def setjmp_pre_handler(self, p: Kprobe, regs: Regs) -> int:
        """Save the stack (and for a guest entry the registers), then run the entry."""
        jp: Jprobe = p._owner
        cpu = regs.cpu
        kcb = self.kprobe_ctlblk[cpu.id]
        cc = self._backend.cc
        regs.flush()
        sp, size = cc.stack_window(regs, MAX_STACK_SIZE)
        task = cpu.current
        size = min(size, task.stack_top - sp) if task is not None else size
        stack = self._kernel.peek(sp, max(0, size))
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
                self._kernel.poke(sp, stack)
            return 0
        kcb.jprobe_saved = (cpu.context_save(), sp, stack)
        regs.write("ip", self._kernel.resolve_function(jp.entry))
        return 1

    def longjmp_break_handler(self, cpu: "CPU", kcb: KprobeCtlblk) -> TrapResult:
        """jprobe_return() trapped: restore registers and stack, then single-step the
        probed instruction."""
        ctx, sp, stack = kcb.jprobe_saved
        kcb.jprobe_saved = None
        cpu.context_restore(ctx)
        self._kernel.poke(sp, stack)
        p = kcb.current_kprobe
        return self.setup_singlestep(cpu, kcb, p, self._Regs(cpu, p.addr))


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

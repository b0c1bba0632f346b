"""A code hook whose callback Unicorn reaches with the least in between.

The optimized probe's detour entry and the trap-free kretprobe trampoline are code hooks on
one instruction, hit once per probe hit: what sits between Unicorn and the probe core's
callback is part of every optimized hit's cost.  A ctypes callback converts its four
arguments and calls through libffi; `code_hook()` in _codehook_native.c, a small C
extension that Unicorn calls directly, converts one.  An empty Python callback on a bare
x86_64 instance, 2026-12-07 on this host: 0.073 us through the C dispatch, 0.135 us as a
raw ctypes callback, 0.41 us through the binding's `hook_add` (the `bench kprobe`
yardstick).

The protocol, the same in C and in the ctypes twin here:

    stop = callback(addr)               # an exception: stop = on_error(exception)
    if stop: on_stop()                  # end the quantum now (a nested call's request)

`callback` is bound to its CPU beforehand, so Unicorn's handle, the size and user_data are
not passed on.  Where the extension was not built (no C compiler or no Python headers at
install), or with `SMPKPROBES_CODE_HOOK=python`, the twin runs.
"""

from __future__ import annotations

import ctypes
import os
from typing import Callable

from unicorn.unicorn_py3.unicorn import HOOK_CODE_CFUNC

try:
    from . import _codehook_native
except ImportError:         # not built here
    _codehook_native = None


class HookCtx(ctypes.Structure):
    """The C callback's user_data: `hook_ctx` in _codehook_native.c, field for field (the
    py_object fields hold their references as long as the structure lives)."""

    _fields_ = [("callback", ctypes.py_object),
                ("on_error", ctypes.py_object),
                ("on_stop", ctypes.py_object)]


def hook_route() -> str:
    """Which dispatch a code hook made now gets: "c" or "python" (the ctypes twin)."""
    if _codehook_native is None or os.environ.get("SMPKPROBES_CODE_HOOK") == "python":
        return "python"
    return "c"


def code_hook(callback: Callable[[int], object], on_error: Callable[[BaseException], object],
              on_stop: Callable[[], None]) -> tuple[object, object]:
    """`(function pointer, user_data)` for `uc_hook_add(UC_HOOK_CODE, ...)`.  The caller
    keeps both alive as long as the hook may run."""
    if hook_route() == "c":
        ctx = HookCtx(callback, on_error, on_stop)
        return ctypes.c_void_p(_codehook_native.CALLBACK), ctx

    def hook(_uc, addr, _size, _user):
        try:
            stop = callback(addr)
        except BaseException as exc:
            stop = on_error(exc)
        if stop:
            on_stop()
    return HOOK_CODE_CFUNC(hook), None

"""Checks made before a (un)registration changes anything (KPROBES.md section 2).

A batch is refused whole, before any probe is touched, when one of its entries is not a
probe of the right kind (TypeError), has a field of the wrong type (TypeError), appears
twice, or belongs to another machine or to a Kretprobe or Jprobe (KprobeError).  The
checks that need the machine's symbols (unknown symbol, not probeable text, ...) stay in
the registry, where a failing batch is rolled back.
"""

from __future__ import annotations

import errno as E
import inspect

from .._errors import KprobeError
from ._probes import Jprobe, Kprobe, Kretprobe

_KINDS = {Kprobe: "register_kprobe", Kretprobe: "register_kretprobe", Jprobe: "register_jprobe"}


def as_list(items, cls: type) -> list:
    """The batch argument as a list, or a TypeError naming what was expected."""
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise TypeError(f"expected a list of {cls.__name__} objects, not "
                        f"{type(items).__name__}")
    return list(items)


def check_kind(item, cls: type, index: int | None = None) -> None:
    """`item` must be a `cls` (a plain Kprobe for the kprobe functions: not one that a
    Kretprobe or Jprobe owns)."""
    where = "" if index is None else f"entry {index}: "
    if not isinstance(item, cls):
        raise TypeError(f"{where}expected a {cls.__name__}, not {type(item).__name__} "
                        f"(the {_KINDS.get(type(item), 'kprobes')} functions take those)")
    if cls is Kprobe and item._owner is not None:
        owner = type(item._owner).__name__
        raise KprobeError(E.EINVAL, f"{where}this Kprobe belongs to a {owner}: use the "
                                    f"{owner.lower()} functions with the {owner} itself",
                          index=index)


def _int_field(obj, name: str, optional: bool = False) -> None:
    v = getattr(obj, name)
    if v is None and optional:
        return
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{type(obj).__name__}.{name} must be an int"
                        f"{' or None' if optional else ''}, not {type(v).__name__} {v!r}")


def _handler(obj, name: str, value=None) -> None:
    h = getattr(obj, name) if value is None else value
    if h is None:
        return
    if not callable(h):
        raise TypeError(f"{type(obj).__name__}.{name} must be a function, not "
                        f"{type(h).__name__}")
    if inspect.iscoroutinefunction(h) or inspect.isasyncgenfunction(h) or \
            inspect.iscoroutinefunction(getattr(h, "__call__", None)):
        raise TypeError(f"{type(obj).__name__}.{name} is an async function: handlers run "
                        f"inside the trap with preemption disabled and must not await; "
                        f"make it a plain def")


def check_fields(item) -> None:
    """The types of a probe's user-set fields (KPROBES.md section 2: integers, and callables
    that are not coroutine functions)."""
    kp = item if isinstance(item, Kprobe) else item.kp
    if kp.symbol_name is not None and not isinstance(kp.symbol_name, str):
        raise TypeError(f"Kprobe.symbol_name must be a str or None, not "
                        f"{type(kp.symbol_name).__name__}")
    _int_field(kp, "offset")
    _int_field(kp, "addr", optional=True)
    if isinstance(item, Kprobe):
        for name in ("pre_handler", "post_handler", "fault_handler"):
            _handler(item, name)
    elif isinstance(item, Kretprobe):
        for name in ("handler", "entry_handler"):
            _handler(item, name)
        _int_field(item, "data_size")
        _int_field(item, "maxactive")
        if item.data_size < 0:
            raise KprobeError(E.EINVAL, f"Kretprobe.data_size must be >= 0, not "
                                        f"{item.data_size}")
    elif isinstance(item, Jprobe):
        entry = item.entry
        if not isinstance(entry, (str, int)) or isinstance(entry, bool):
            if entry is None:
                raise TypeError("Jprobe.entry must be a guest function (a symbol or an "
                                "address) or a Python function, not None")
            _handler(item, "entry")


def check_register_batch(items: list, cls: type, subsystem) -> None:
    """Everything about a register batch that needs no symbol lookup, before any change."""
    seen: set[int] = set()
    for i, item in enumerate(items):
        index = i if len(items) > 1 else None
        check_kind(item, cls, index)
        check_fields(item)
        kp = item if isinstance(item, Kprobe) else item.kp
        if id(kp) in seen:
            raise KprobeError(E.EINVAL, f"probe {i}: {item!r} appears twice in the batch "
                                        f"(it would be already registered)", index=i)
        seen.add(id(kp))
        check_not_registered(kp, subsystem, index)


def check_not_registered(kp: Kprobe, subsystem, index: int | None = None) -> None:
    owner = kp._kprobes
    if not kp._registered:
        return
    prefix = "" if index is None else f"probe {index}: "
    if owner is not subsystem:
        raise KprobeError(E.EBUSY, f"{prefix}{kp!r} is registered on another machine; "
                                   f"unregister it there first", index=index)
    raise KprobeError(E.EINVAL, f"{prefix}{kp!r} is already registered", index=index)


def check_unregister_batch(items: list, cls: type, subsystem) -> None:
    """Refusals of an unregister batch (KPROBES.md section 2), before any change."""
    for i, item in enumerate(items):
        index = i if len(items) > 1 else None
        check_kind(item, cls, index)
        kp = item if isinstance(item, Kprobe) else item.kp
        if kp._registered and kp._kprobes is not subsystem:
            raise KprobeError(E.EINVAL, f"{kp!r} is registered on another machine: "
                                        f"unregister it there", index=index)

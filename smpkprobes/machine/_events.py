"""Typed events: what the machine (and the probe core, on its own bus) tells its observers.

A subscriber is called synchronously, in subscription order, with the event; it may read
anything but should change nothing (the invariant checker, tests).  The kernel code beside
the machine (the probe core) subscribes the same way to what the kernel gives notifier
chains for: a task exiting, an oops, a module going away.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:    # pragma: no cover
    from ._cpu import CPU
    from ._modules import Module
    from ._task import Task


class Event:
    __slots__ = ()

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class QuantumEnded(Event):
    """`cpu` ran a quantum (published after the machine's own bookkeeping for it)."""

    __slots__ = ("cpu",)

    def __init__(self, cpu: "CPU"):
        self.cpu = cpu


class TaskExited(Event):
    """`task` is dead (returned, exited or oopsed); its stack is about to be reused."""

    __slots__ = ("task",)

    def __init__(self, task: "Task"):
        self.task = task


class TaskOopsed(Event):
    """The task on `cpu` is being killed with an oops (before its exit)."""

    __slots__ = ("cpu",)

    def __init__(self, cpu: "CPU"):
        self.cpu = cpu


class ModuleGoing(Event):
    """Module text is about to be freed: its init text ("init_freed") or all of it
    ("unload")."""

    __slots__ = ("what", "module")

    def __init__(self, what: str, module: "Module"):
        self.what = what
        self.module = module


class EventBus:
    """Subscribers per event type."""

    def __init__(self):
        self._subscribers: dict[type, list[Callable[[Any], None]]] = {}

    def subscribe(self, kind: type, fn: Callable[[Any], None], *, first: bool = False) -> None:
        """Call `fn(event)` for every event of type `kind`; `first`: before the others."""
        subs = self._subscribers.setdefault(kind, [])
        subs.insert(0, fn) if first else subs.append(fn)

    def unsubscribe(self, kind: type, fn: Callable[[Any], None]) -> None:
        self._subscribers.get(kind, []).remove(fn)

    def wants(self, kind: type) -> bool:
        return bool(self._subscribers.get(kind))

    def publish(self, event: Event) -> None:
        subs = self._subscribers.get(type(event))
        if subs:
            for fn in list(subs):
                fn(event)

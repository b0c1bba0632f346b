"""Typed events the probe core publishes on `KprobesSubsystem.events` (an `EventBus`, see
`machine/_events`), for observers such as the invariant checker.  Hot-path facts are not
events: they are counters and records the observer reads (`traps`, `hits`, `missed`,
`unrecoverable`, `stale_handlers`, `kprobe_ctlblk`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..machine._services import Event

if TYPE_CHECKING:    # pragma: no cover
    from ._probes import Kretprobe
    from ._state import AggrKprobe


class KprobesArmed(Event):
    """The breakpoints of `probes` were written, and every CPU synced (arm_kprobe)."""

    __slots__ = ("probes",)

    def __init__(self, probes: "list[AggrKprobe]"):
        self.probes = probes


class KprobesDisarmed(Event):
    """The original instructions of `probes` were written back, every CPU synced."""

    __slots__ = ("probes",)

    def __init__(self, probes: "list[AggrKprobe]"):
        self.probes = probes


class KretprobeRegistered(Event):
    """`rp` was registered: its instance pool is full."""

    __slots__ = ("rp",)

    def __init__(self, rp: "Kretprobe"):
        self.rp = rp

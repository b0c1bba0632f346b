"""The probe core's state: the per-CPU `struct kprobe_ctlblk` and its status, and the
aggregate kprobe (`_Site`, one per probed address)."""

from __future__ import annotations

import enum

from smpkprobes.cpus import InsnPlan, StepKind

from ._probes import KPROBE_FLAG_DISABLED, Kprobe


class Status(enum.Enum):
    NONE = 0
    HIT_ACTIVE = 1
    HIT_SS = 2
    HIT_SSDONE = 3
    REENTER = 4


# The hit path compares against these module globals rather than Status.X attribute lookups.
_NONE, _HIT_ACTIVE, _REENTER = Status.NONE, Status.HIT_ACTIVE, Status.REENTER


# == the per-CPU control block ========================================================
class KprobeCtlblk:
    """`struct kprobe_ctlblk`: what one CPU is doing with probes right now.

    Setting `transitions` to a list records every status change into it, as (address of
    the current probe or 0, status name), until it is set back to None.  Recording swaps
    in a subclass meanwhile, so that the hit path's plain `kcb.status = ...` costs nothing
    more when it is off."""

    __slots__ = ("current", "status", "ss_addr", "prev", "jprobe_saved", "_log")

    def __init__(self):
        self.current: _Site | None = None
        self.status = Status.NONE
        self.ss_addr = 0
        self.prev = None            # one level of prev_kprobe: (current, status, ss_addr)
        self.jprobe_saved = None    # (context, sp, stack bytes)
        self._log = None

    @property
    def transitions(self) -> list | None:
        return self._log

    @transitions.setter
    def transitions(self, log: list | None) -> None:
        self._log = log
        self.__class__ = KprobeCtlblk if log is None else _RecordingCtlblk

    def reset(self) -> None:
        self.current = None
        self.status = Status.NONE
        self.ss_addr = 0
        self.jprobe_saved = None


_status_slot = KprobeCtlblk.status      # the slot itself, beneath the recording property


class _RecordingCtlblk(KprobeCtlblk):
    """A control block that logs its status changes to `transitions`."""

    __slots__ = ()

    @property
    def status(self) -> Status:
        return _status_slot.__get__(self)

    @status.setter
    def status(self, status: Status) -> None:
        _status_slot.__set__(self, status)
        self._log.append((self.current.addr if self.current else 0, status.name))


class _Site:
    """Everything at one probed address: the aggregate kprobe."""

    __slots__ = ("addr", "plan", "boostable", "orig", "slot", "children", "armed", "gone",
                 "boost_used", "detour")

    def __init__(self, addr: int, plan: InsnPlan, orig: bytes):
        self.addr = addr
        self.plan = plan
        # Stepped out of line with a jump back allowed (still never with a post_handler).
        self.boostable = plan is not None and plan.kind is StepKind.OUT_OF_LINE \
            and plan.boostable
        self.orig = orig
        self.slot: int | None = None
        self.children: tuple[Kprobe, ...] = ()
        self.armed = False
        self.gone = False
        self.boost_used = False
        # The stub of its detour while the site is queued for or has jump optimization
        # (KPROBE_FLAG_OPTIMIZED): a breakpoint hit goes there instead (_optprobe).
        self.detour: int | None = None

    def enabled(self) -> bool:
        return not self.gone and any(not c.disabled for c in self.children)

    def has_post_handler(self) -> bool:
        for c in self.children:
            if c.post_handler is not None and not c.flags & KPROBE_FLAG_DISABLED:
                return True
        return False

    def jprobe(self) -> Kprobe | None:
        return next((c for c in self.children if c._type == "j"), None)

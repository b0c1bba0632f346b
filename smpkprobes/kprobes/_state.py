"""The probe core's state: the per-CPU `struct kprobe_ctlblk` and its status, and the
aggregate kprobe (`AggrKprobe`, one per probed address)."""

from __future__ import annotations

import enum

from smpkprobes.cpus import InsnPlan, StepKind

from ..machine._services import TrapResult, resume_at
from ._probes import KPROBE_FLAG_DISABLED, KPROBE_FLAG_GONE, Kprobe

_OFF = KPROBE_FLAG_DISABLED | KPROBE_FLAG_GONE


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
    """`struct kprobe_ctlblk`, with the CPU's `current_kprobe`: what one CPU is doing with
    probes right now.  The probe core keeps one per CPU (`KprobesSubsystem.kprobe_ctlblk`,
    indexed by CPU id, as `per_cpu(kprobe_ctlblk, cpu)`).

    Setting `transitions` to a list records every status change into it, as (address of
    the current probe or 0, status name), until it is set back to None.  Recording swaps
    in a subclass meanwhile, so that the hit path's plain `kcb.kprobe_status = ...` costs
    nothing more when it is off."""

    __slots__ = ("current_kprobe", "kprobe_status", "ss_addr", "prev_kprobe", "jprobe_saved",
                 "_log")

    def __init__(self):
        self.current_kprobe: AggrKprobe | None = None
        self.kprobe_status = Status.NONE
        self.ss_addr = 0                # where the out-of-line step ends (its breakpoint)
        self.prev_kprobe = None         # one level: (current_kprobe, kprobe_status, ss_addr)
        self.jprobe_saved = None        # (context, sp, stack bytes)
        self._log = None

    @property
    def transitions(self) -> list | None:
        return self._log

    @transitions.setter
    def transitions(self, log: list | None) -> None:
        self._log = log
        self.__class__ = KprobeCtlblk if log is None else _RecordingCtlblk

    def reset(self) -> None:
        """reset_current_kprobe, and what the step left."""
        self.current_kprobe = None
        self.kprobe_status = Status.NONE
        self.ss_addr = 0
        self.jprobe_saved = None

    def save_previous_kprobe(self) -> None:
        self.prev_kprobe = (self.current_kprobe, self.kprobe_status, self.ss_addr)

    def restore_previous_kprobe(self) -> None:
        self.current_kprobe, status, self.ss_addr = self.prev_kprobe
        self.prev_kprobe = None
        self.kprobe_status = status


_status_slot = KprobeCtlblk.kprobe_status    # the slot itself, beneath the recording property


class _RecordingCtlblk(KprobeCtlblk):
    """A control block that logs its status changes to `transitions`."""

    __slots__ = ()

    @property
    def kprobe_status(self) -> Status:
        return _status_slot.__get__(self)

    @kprobe_status.setter
    def kprobe_status(self, status: Status) -> None:
        _status_slot.__set__(self, status)
        current = self.current_kprobe
        self._log.append((current.addr if current else 0, status.name))


# == the aggregate kprobe =============================================================
class AggrKprobe:
    """Everything at one probed address: the aggregate kprobe, whose children are the
    registered probes there (newest first, a jprobe last)."""

    __slots__ = ("addr", "plan", "boostable", "orig", "slot", "children", "armed", "gone",
                 "boost_used", "step_resume", "boost_resume", "post", "detour")

    def __init__(self, addr: int, plan: InsnPlan | None, orig: bytes):
        self.addr = addr
        self.plan = plan
        # Stepped out of line with a jump back allowed (still never with a post_handler).
        self.boostable = plan is not None and plan.kind is StepKind.OUT_OF_LINE \
            and plan.boostable
        self.orig = orig
        self.slot: int | None = None
        self.children: tuple[Kprobe, ...] = ()
        # Whether an enabled child has a post_handler (the kernel's aggr_post_handler):
        # no boost then.  Kept by `refresh` whenever the children or their flags change.
        self.post = False
        self.armed = False
        self.gone = False
        self.boost_used = False
        # The trap results that send a CPU into the slot: made once, returned on every hit.
        self.step_resume: TrapResult | None = None
        self.boost_resume: TrapResult | None = None
        # While the probe is queued for or has jump optimization (KPROBE_FLAG_OPTIMIZED):
        # the trap result that sends a breakpoint hit to its detour's stub (_optprobe).
        self.detour: TrapResult | None = None

    def set_slot(self, slot: int | None, stride: int = 0) -> None:
        """The slot holds the copy that ends in a breakpoint, and at `slot + stride` the
        one that jumps back (boosted)."""
        self.slot = slot
        self.step_resume = None if slot is None else resume_at(slot)
        self.boost_resume = None if slot is None else resume_at(slot + stride)

    def refresh(self) -> None:
        """The children, or one's DISABLED flag, changed."""
        self.post = self.has_post_handler()

    def enabled(self) -> bool:
        return not self.gone and any(not c.flags & _OFF for c in self.children)

    def has_post_handler(self) -> bool:
        for c in self.children:
            if c.post_handler is not None and not c.flags & _OFF:
                return True
        return False

    def jprobe(self) -> Kprobe | None:
        return next((c for c in self.children if c._type == "j"), None)

"""Always-on invariant checks: the probe core's conservation laws, checked while it runs.

Every `Machine` carries an `Invariants` (`m.invariants`) unless built with
`invariants=False`.  It watches the probe core from the outside, the way a lockdep or
KASAN watches the kernel, and checks five laws:

  text     a probed address that is not armed holds its original bytes, and an armed one
           holds the breakpoint (or, jump-optimized, its jump);
  slots    no CPU executes in an instruction slot that has been freed;
  pool     for every registered kretprobe, free + in use == maxactive;
  entries  hits + nmissed == entries: every breakpoint trap at a probed address ends as
           exactly one hit or one miss, and every entry into a kretprobe's function takes
           an instance or counts one miss;
  handlers no handler of a probe runs once unregister has returned for it;
  registry whenever the registry lock is free, every registration is whole: each probe
           marked registered is a child of its site and registered on this machine only,
           every site has children, and every slot in use belongs to a site;
  slots    (also) free + in use + garbage == every slot there is, and every detour buffer
           in use belongs to a jump-optimized probe or waits for its grace period to be
           freed;
  ctlblk   at a quantum boundary, a CPU with no probe in flight (preemptible, no deferred
           trap, not in a slot) has an idle kprobe_ctlblk;
  orphans  a breakpoint written into text (a text write that begins with the breakpoint's
           bytes) that is still there, where an instruction starts, while nothing owns it:
           no registered, armed probe at its address, and no jump the optimizer has
           written or is writing there.  Bytes equal to the breakpoint that are not one -
           the operand of an optimized probe's jump, an instruction's own bytes put back
           when the jump is removed - are not orphans.

It only observes: it subscribes to the events the machine publishes (`QuantumEnded`,
`ModuleGoing`) and those of the probe core (`KprobesArmed`, `KprobesDisarmed`,
`KretprobeRegistered`), and reads the probe core's public state.

Where they are checked:
  * after every quantum (`QuantumEnded`): slots, the pools of the registered
    kretprobes (with their entries), and the entries and handlers laws of kprobe hits.
    Those are not checked around each trap or call, which would put a wrapper on the hit
    path: the probe core counts each trap at a registered probe and each way one ends
    (`traps`, `hits`, `missed`, `unrecoverable`) and each entry into a kretprobe's
    function (`Kretprobe.statistics().entries`), and records a pre, post or return handler of an
    unregistered probe that is about to run (`stale_handlers`); the checker compares and
    reports after the quantum in which it happened;
  * after every arm and disarm, on the sites patched (text only changes there);
  * once more when the machine shuts down.

A violation is recorded (`violations`), printed to `printk_log` and traced as an
("invariant", text) event; with `mode="raise"` (the default) leaving the machine's
`async with` block raises `InvariantViolation` listing them, unless something else is
already propagating.  The checks only read state, so a run with and without them is the
same run, event for event, as long as nothing is violated.

Cost: measured with `smpkprobes selftest --invariant-cost`; a few per cent of a hit-heavy
run (see README).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..machine import _memory as mem
from .._errors import SimulationError

if TYPE_CHECKING:    # pragma: no cover
    from ..kprobes._core import KprobesSubsystem, Kretprobe
    from ..machine._cpu import CPU
    from ..machine._machine import SMPMachine

from ..kprobes._events import (KprobesArmed, KprobesChanged, KprobesDisarmed,
                                KprobesFreed, KretprobeRegistered)
from ..machine._events import ModuleGoing, QuantumEnded, TextWritten

MAX_RECORDED = 64


ARMING_SWEEP = 512         # sites check_arming looks at per registry operation, at most


class InvariantViolation(SimulationError):
    """The probe core broke one of its invariants during the run."""

    def __init__(self, violations: list[str]):
        shown = "\n  ".join(violations[:10])
        more = f"\n  ... and {len(violations) - 10} more" if len(violations) > 10 else ""
        super().__init__(f"{len(violations)} kprobes invariant violation(s):\n  {shown}{more}")
        self.violations = violations


class Invariants:
    """The checker attached to one machine (see the module docstring)."""

    def __init__(self, machine: "SMPMachine", kprobes: "KprobesSubsystem", mode: str = "raise"):
        if mode not in ("raise", "record"):
            raise ValueError(f"invariants mode must be 'raise' or 'record', not {mode!r}")
        self.mode = mode
        self._m = machine
        self._k = kprobes
        self.violations: list[str] = []
        self.checks = 0
        self._seen: set[str] = set()
        self._tracked: dict[int, bytes] = {}      # every address ever probed -> original bytes
        self._rps: dict[int, "Kretprobe"] = {}    # the kretprobes registered (or once were)
        self._slot_size = kprobes.slots.slot_size
        # Each CPU's PC as its last quantum left it: a CPU only moves while it runs, so one
        # register read per quantum keeps this exact.
        self._pcs = {cpu.id: 0 for cpu in machine.cpus}
        self._in_slots: set[int] = set()     # ids of the CPUs whose _pcs are in the slot area
        text = machine.kernel.sections[".text"]
        self._kernel_text = (text[0], text[0] + text[1])
        self._bp = machine.backend.breakpoint
        self._lost_traps = 0                      # traps already reported as neither hit nor miss
        self._stale_seen = 0                      # stale_handlers already reported
        self._sweep = 0                           # where check_arming's window starts
        self._generation = -1                     # the registry's, when last checked
        self._suspects: set[int] = set()          # text addresses a breakpoint was written to
        self._registered_seen: set = set()        # probes seen linked in the registry
        self._total_slots = kprobes.slots.statistics()["free"]
        machine.events.subscribe(QuantumEnded, self._after_quantum)
        machine.events.subscribe(ModuleGoing, self._module_event)
        machine.events.subscribe(TextWritten, self._text_written)
        kprobes.events.subscribe(KprobesArmed, self._armed)
        kprobes.events.subscribe(KprobesDisarmed, self._disarmed)
        kprobes.events.subscribe(KretprobeRegistered, self._track_kretprobe)
        kprobes.events.subscribe(KprobesChanged, self.check_arming)
        kprobes.events.subscribe(KprobesFreed, self._freed)

    # -- reporting ------------------------------------------------------------------------
    def violation(self, law: str, what: str) -> None:
        msg = f"{law}: {what}"
        if msg in self._seen or len(self.violations) >= MAX_RECORDED:
            return
        self._seen.add(msg)
        self.violations.append(msg)
        self._m.printk_log.append(f"kprobes: invariant violated: {msg}")
        self._m.trace_event("invariant", msg)

    def finish(self, raise_: bool = True) -> None:
        """The final check, at shutdown; raises in "raise" mode if anything was violated."""
        self.check_text()
        self.check_pools()
        self.check_hits("at shutdown")
        self.check_registry(force=True)
        self.check_orphans()
        if raise_ and self.mode == "raise" and self.violations:
            raise InvariantViolation(list(self.violations))

    # -- after every quantum --------------------------------------------------------------
    def _after_quantum(self, event: QuantumEnded) -> None:
        cpu = event.cpu
        self.checks += 1
        pc = self._pcs[cpu.id] = cpu.pc
        # Only a CPU inside the slot area can break the law; most quanta end elsewhere.
        if mem.SLOTS.start <= pc < mem.SLOTS.end:
            self._in_slots.add(cpu.id)
        else:
            self._in_slots.discard(cpu.id)
        if self._in_slots:
            self.check_slots(cached=True)
        if self._rps:
            self.check_pools()
        k = self._k
        # (The cheap test first: this runs after every quantum.)
        if k.traps - k.hits - k.missed - k.unrecoverable != self._lost_traps \
                or len(k.stale_handlers) != self._stale_seen:
            self.check_hits(f"in quantum {cpu.quanta} of cpu{cpu.id}")
        kcb = k.kprobe_ctlblk[cpu.id]
        if kcb.current_kprobe is not None or kcb.prev_kprobe is not None \
                or kcb.jprobe_saved is not None:
            self.check_ctlblk(cpu)
        if k.generation != self._generation:
            self.check_registry()
        if self._suspects:
            self.check_orphans()

    # -- stuck state ------------------------------------------------------------------------
    def check_ctlblk(self, cpu: "CPU") -> None:
        """A CPU with no probe in flight has an idle control block."""
        in_flight = cpu.current is not None and (
            cpu.preempt_count or cpu.deferred_trap or mem.SLOTS.start <= cpu.pc < mem.SLOTS.end)
        kcb = self._k.kprobe_ctlblk[cpu.id]
        if not in_flight and (kcb.current_kprobe is not None or kcb.kprobe_status.name != "NONE"
                              or kcb.prev_kprobe is not None):
            self.violation("ctlblk", f"cpu{cpu.id}'s kprobe_ctlblk is "
                                     f"{kcb.kprobe_status.name} with no probe in flight "
                                     f"(preempt count {cpu.preempt_count})")

    def check_registry(self, force: bool = False) -> None:
        """With the registry lock free, every registration is whole (see the docstring)."""
        k = self._k
        if k._mutex.locked() and not force:
            return
        self._generation = k.generation
        owners = {}
        for addr in sorted(k._kprobe_table):
            site = k._kprobe_table[addr]
            if not site.children:
                self.violation("registry", f"site {self._m.format_addr(addr)} has no probes "
                                           f"but is still in the table")
            for c in site.children:
                if not c._registered:
                    self.violation("registry", f"{c!r} is linked at {addr:#x} but not "
                                               f"marked registered")
                elif c._kprobes is not k:
                    self.violation("registry", f"{c!r} is registered on this machine and "
                                               f"on another one")
                owners[id(c)] = c
                self._registered_seen.add(c)
            if site.slot is not None:
                owners[("slot", site.slot)] = site
        slots = k.slots
        for slot in sorted(slots._used):
            if ("slot", slot) not in owners:
                self.violation("slots", f"insn slot {slot:#x} is in use by no probe (leaked)")
        st = slots.statistics()
        if st["free"] + st["used"] + st["garbage"] != self._total_slots:
            self.violation("slots", f"free {st['free']} + in use {st['used']} + garbage "
                                    f"{st['garbage']} != {self._total_slots} slots")
        opt = k.optimizer
        pending = {id(op) for op in opt._free_list}
        if opt._batch is not None:
            pending.update(id(op) for op in opt._batch.frees)
        for stub in sorted(opt._by_stub):
            op = opt._by_stub[stub]
            if opt.ops.get(op.site.addr) is not op and id(op) not in pending:
                self.violation("slots", f"detour buffer {stub:#x} is in use by no probe "
                                        f"(leaked)")
        for p in list(self._registered_seen):
            if p._registered and p._kprobes is k and id(p) not in owners:
                self.violation("registry", f"{p!r} is marked registered here but is linked "
                                           f"at no site (a registration half done)")
            if not p._registered:
                self._registered_seen.discard(p)

    def _text_written(self, event: TextWritten) -> None:
        bp = self._bp
        if event.data[:len(bp)] == bp:
            # An armed probe's own breakpoint (arm_kprobe marks the site armed first) is
            # owned: only the others are worth a look, after every quantum until resolved.
            site = self._k._kprobe_table.get(event.addr)
            if site is None or not site.armed:
                self._suspects.add(event.addr)

    def check_orphans(self) -> None:
        """A breakpoint in the text that nothing owns (see the module docstring)."""
        k = self._k
        if k._mutex.locked():
            return
        bp = self._bp
        for addr in sorted(self._suspects):
            self._suspects.discard(addr)
            if self._m.memory.peek(addr, len(bp)) != bp:
                continue
            site = k._kprobe_table.get(addr)
            if site is not None and site.armed:
                continue                    # the probe's own breakpoint
            if k.optimizer.jump_text(addr, len(bp)) == bp:
                continue                    # the optimizer's: its jump, or text_poke_bp's int3
            if not self._starts_instruction(addr):
                continue                    # an operand's bytes, not an instruction
            self.violation("orphans", f"a breakpoint at {self._m.format_addr(addr)} that no "
                                      f"registered probe owns")

    def _starts_instruction(self, addr: int) -> bool:
        """Whether an instruction starts at `addr`, decoding its function from the start
        in the text as it is without the probes' bytes; outside a function, assume so."""
        sym = self._m.kallsyms.containing(addr)
        if sym is None or not sym.is_func:
            return True
        text = self._k.original_text(sym.addr, sym.size)
        insn_length = self._m.backend.insn_length
        max_len = self._m.backend.max_insn_len
        off, want = 0, addr - sym.addr
        while off < want:
            size = insn_length(text[off:off + max_len], sym.addr + off)
            if size is None:
                return True
            off += size
        return off == want

    def check_slots(self, cached: bool = False) -> None:
        """No CPU executes in a freed slot."""
        is_used = self._k.slots.is_used
        lo, hi = mem.SLOTS.start, mem.SLOTS.end
        pcs = self._pcs
        for cpu in self._m.cpus:
            if cpu.current is None:
                continue
            pc = pcs[cpu.id] if cached else cpu.pc
            if lo <= pc < hi:
                base = pc - (pc - lo) % self._slot_size
                if not is_used(base):
                    self.violation("slots", f"cpu{cpu.id} executes at {pc:#x} in insn slot "
                                            f"{base:#x}, which is free")

    def _armed(self, event: KprobesArmed) -> None:
        for p in event.probes:
            self._tracked.setdefault(p.addr, p.orig)
        self.check_text([p.addr for p in event.probes])

    def _disarmed(self, event: KprobesDisarmed) -> None:
        self.check_text([p.addr for p in event.probes])

    def check_text(self, addrs=None) -> None:
        """Disarmed text equals the original bytes; armed text holds the breakpoint.
        Checks `addrs`, or every address ever armed."""
        get_kprobe = self._k.get_kprobe
        tracked = self._tracked
        peek = self._m.memory.peek
        bp = self._bp
        for addr in list(tracked) if addrs is None else addrs:
            orig = tracked.get(addr)
            site = get_kprobe(addr)
            if orig is None or (site is not None and site.gone) or not self._text_alive(addr):
                tracked.pop(addr, None)
                continue
            now = peek(addr, len(orig))
            armed = site is not None and site.armed
            # Under a jump the optimizer has written, the jump's bytes.
            want = self._k.optimizer.expected_text(addr, bp if armed else orig)
            if now != want:
                state = "armed" if armed else "disarmed"
                self.violation("text", f"{state} probe address {self._m.format_addr(addr)} "
                                       f"holds {now.hex()}, not {want.hex()}")

    def _freed(self, event: KprobesFreed) -> None:
        """Freed after a grace period: no CPU is inside one of them, in its handlers, its
        step or its jprobe entry (current or saved as prev_kprobe), nor in its slot.  (The
        scheduler never preempts a task inside the slot area, so no sleeping task can be.)"""
        dead = {id(site): site for site in event.probes}
        slots = [(s.slot, s.slot + self._slot_size) for s in event.probes if s.slot is not None]
        for cpu, kcb in zip(self._m.cpus, self._k.kprobe_ctlblk):
            prev = kcb.prev_kprobe[0] if kcb.prev_kprobe else None
            for site in (kcb.current_kprobe, prev):
                if site is not None and id(site) in dead:
                    self.violation("freed", f"{self._m.format_addr(site.addr)} freed while "
                                            f"cpu{cpu.id} is inside it ({kcb.kprobe_status.name})")
            pc = cpu.pc
            if any(lo <= pc < hi for lo, hi in slots):
                self.violation("freed", f"a slot freed while cpu{cpu.id} executes in it "
                                        f"({pc:#x})")

    def check_arming(self, _event=None) -> None:
        """After every registry operation: a site is armed if and only if kprobes are
        enabled, some child is enabled, and it is not GONE (KPROBES.md sections 2 and 6),
        and its text says the same."""
        enabled = self._k.enabled
        sites = self._k._sorted_sites()
        if len(sites) > ARMING_SWEEP:
            # Thousands of probes: a rotating window per operation keeps this O(1) amortised
            # per operation while every site is still looked at every few operations.
            start = self._sweep % len(sites)
            self._sweep += ARMING_SWEEP
            sites = (sites + sites)[start:start + ARMING_SWEEP]
        for site in sites:
            want = enabled and not site.gone and site.enabled()
            if site.armed != want:
                why = ("kprobes/enabled is 0" if not enabled else "it is GONE" if site.gone
                       else "every child is disabled" if not site.enabled()
                       else "a child is enabled")
                self.violation("arming", f"{self._m.format_addr(site.addr)} is "
                                         f"{'armed' if site.armed else 'disarmed'} though "
                                         f"{why}")
            self._tracked.setdefault(site.addr, site.orig)
        self.check_text([site.addr for site in sites])

    def _text_alive(self, addr: int) -> bool:
        if self._kernel_text[0] <= addr < self._kernel_text[1]:
            return True
        module = self._m.module_of(addr)
        return module is not None and not (module.in_init(addr) and module.init_freed)

    def _module_event(self, event: ModuleGoing) -> None:
        # Its text is about to be freed: the bytes there stop being ours to check.
        module = event.module
        for addr in [a for a in self._tracked if module.in_text(a) or module.in_init(a)]:
            del self._tracked[addr]

    def check_pools(self) -> None:
        """free + in use == maxactive, and taken + nmissed == entries, per kretprobe."""
        for key, rp in list(self._rps.items()):
            if not rp.kp._registered:
                del self._rps[key]
                continue
            s = rp.statistics()
            if s.free + s.in_use != s.maxactive:
                self.violation("pool", f"{rp!r}: free {s.free} + in use {s.in_use} != "
                                       f"maxactive {s.maxactive}")
            if s.taken + s.missed != s.entries:
                self.violation("entries", f"{rp!r}: taken {s.taken} + nmissed {s.missed} "
                                          f"!= entries {s.entries}")

    # -- kprobe hits ----------------------------------------------------------------------
    def check_hits(self, where: str) -> None:
        """Every trap at a registered probe ended as exactly one hit, one miss or one
        unrecoverable reentry; no handler of an unregistered probe ran.  `where` names the
        stretch of the run since the last check."""
        k = self._k
        lost = k.traps - k.hits - k.missed - k.unrecoverable - self._lost_traps
        if lost:
            self._lost_traps += lost
            self.violation("entries", f"{lost} trap(s) at a probed address {where} ended as "
                                      f"neither a hit nor a miss" if lost > 0 else
                                      f"{-lost} more hits and misses than traps at probed "
                                      f"addresses {where}")
        if len(k.stale_handlers) > self._stale_seen:
            fresh = k.stale_handlers[self._stale_seen:]
            self._stale_seen += len(fresh)
            for addr, probe, which in fresh:
                if which == "return handler":
                    self.violation("handlers", f"return handler of {probe!r} about to run "
                                               f"after unregister_kretprobe returned")
                else:
                    self.violation("handlers", f"{which} of {probe!r} at "
                                               f"{self._m.format_addr(addr)} about to run "
                                               f"after it was unregistered")

    def _track_kretprobe(self, event: KretprobeRegistered) -> None:
        self._rps[id(event.rp)] = event.rp

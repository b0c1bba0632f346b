"""Registration and arming: register_* / unregister_* (batches, rollback, one grace period
for a batch), arm_kprobe / disarm_kprobe through text_poke, enable / disable, kprobes/enabled,
and module text going away (kill_kprobe).  A mixin of `KprobesSubsystem`."""

from __future__ import annotations

import errno as E

from smpkprobes.cpus import StepKind, UnsteppableError

import trio

from .._errors import KprobeError
from ._probes import (KPROBE_FLAG_DISABLED, KPROBE_FLAG_GONE, KRETPROBE_MAX_DATA_SIZE, Jprobe,
                      Kprobe, Kretprobe)
from ..machine._services import ModuleGoing
from ._events import KprobesArmed, KprobesDisarmed, KprobesFreed
from ._state import AggrKprobe
from ._validate import as_list, check_not_registered, check_register_batch, check_unregister_batch


def _describe(items: list) -> tuple:
    """What a batch is about, for ordering host actions deterministically (`host_turn`)."""
    out = []
    for x in items:
        kp = x if isinstance(x, Kprobe) else x.kp
        out.append((kp.symbol_name or "", kp.addr or 0, kp.offset))
    return tuple(out)


class Registry:
    """The registry half of `KprobesSubsystem` (see `_core`).

    Every state change is all-or-nothing under errors and cancellation: a batch is checked
    (`_validate`) before anything changes; each probe's registration, and the whole
    unregistration from disarm to free, run shielded from cancellation, as the kernel
    cannot be interrupted there; a batch that fails or is cancelled between two of its
    probes is rolled back, shielded too."""

    async def register_kprobe(self, p: Kprobe) -> None:
        await self._register_batch([p], Kprobe, self._register, single=True)

    async def register_kprobes(self, probes) -> None:
        await self._register_batch(as_list(probes, Kprobe), Kprobe, self._register)

    async def register_kretprobe(self, rp: Kretprobe) -> None:
        await self._register_batch([rp], Kretprobe, self._register_kretprobe, single=True)

    async def register_kretprobes(self, rps) -> None:
        await self._register_batch(as_list(rps, Kretprobe), Kretprobe,
                                   self._register_kretprobe)

    async def register_jprobe(self, jp: Jprobe) -> None:
        await self._register_batch([jp], Jprobe, self._register_jprobe, single=True)

    async def register_jprobes(self, jps) -> None:
        await self._register_batch(as_list(jps, Jprobe), Jprobe, self._register_jprobe)

    async def _register_batch(self, items: list, cls: type, register_one,
                              single: bool = False) -> None:
        if not items:
            raise KprobeError(E.EINVAL, "empty probe list")
        check_register_batch(items, cls, self)
        await self._kernel.host_turn(("register", cls.__name__, _describe(items)))
        async with self._mutex:
            # Again: another task may have registered one of them while this one waited.
            check_register_batch(items, cls, self)
            done = []
            i = 0
            try:
                for i, item in enumerate(items):
                    with trio.CancelScope(shield=True):
                        await register_one(item)
                    done.append(item)
                    if i + 1 < len(items):
                        await trio.lowlevel.checkpoint_if_cancelled()
            except BaseException as err:
                if done:
                    with trio.CancelScope(shield=True):
                        await self._unregister_many([self._kp_of(x) for x in done])
                        for x in done:
                            if isinstance(x, Kretprobe):
                                self._cleanup_kretprobe(x)
                if isinstance(err, KprobeError) and not single:
                    raise KprobeError(err.errno, f"probe {i}: {err.strerror}",
                                      index=i) from None
                raise

    @staticmethod
    def _kp_of(item) -> Kprobe:
        return item if isinstance(item, Kprobe) else item.kp

    def _resolve(self, p: Kprobe, kind: str) -> int:
        """The checks of KPROBES.md section 2, in order, up to the probed address."""
        m = self._kernel
        check_not_registered(p, self)
        if (p.symbol_name is None) == (p.addr is None):
            raise KprobeError(E.EINVAL, "exactly one of symbol_name and addr must be set")
        if p.symbol_name is not None:
            sym = m.kallsyms.lookup(p.symbol_name)
            if sym is None:
                raise KprobeError(E.ENOENT, f"unknown symbol {p.symbol_name!r}")
            addr = sym.addr + p.offset
        else:
            addr = p.addr + p.offset
        module = m.module_of(addr)
        in_kernel = self._kernel_text[0] <= addr < self._kernel_text[1]
        lo, hi = m.kprobes_text
        if not (in_kernel or module is not None) or lo <= addr < hi:
            raise KprobeError(E.EINVAL, f"{addr:#x} is not probeable text")
        for start, end, name in self._blacklist:
            if start <= addr < end:
                raise KprobeError(E.EINVAL, f"{m.format_addr(addr)} is on the blacklist ({name})")
        if kind == "r":
            sym = m.kallsyms.containing(addr)
            if sym is not None and sym.name in self._backend.kretprobe_blacklist:
                raise KprobeError(E.EINVAL, f"kretprobes may not probe {sym.name}")
        if module is not None and module.in_init(addr) and module.init_freed:
            raise KprobeError(E.ENOENT, f"{addr:#x} is in freed init text of {module.name}")
        sym = m.kallsyms.containing(addr)
        if sym is None or not sym.is_func:
            raise KprobeError(E.EINVAL, f"{addr:#x} is not inside a known function")
        if addr not in self._insn_boundaries(sym):
            raise KprobeError(E.EILSEQ, f"{m.format_addr(addr)} is not on an instruction boundary")
        return addr

    def _insn_boundaries(self, sym) -> frozenset[int]:
        b = self._boundaries.get(sym.addr)
        if b is None:
            code = self.original_text(sym.addr, sym.size)
            starts = []
            off = 0
            while off < len(code):
                size = self._backend.insn_length(code[off:], sym.addr + off)
                if size is None:
                    break
                starts.append(sym.addr + off)
                off += size
            b = self._boundaries[sym.addr] = frozenset(starts)
        return b

    async def _register(self, p: Kprobe) -> None:
        kind = p._type
        addr = self._resolve(p, kind)
        site = self._kprobe_table.get(addr)
        # A GONE aggregate whose module is back (register_aggr_kprobe): it gets a new
        # plan and slot from the new text, and is armed again; its old children stay GONE.
        revive = site is not None and site.gone and self._text_alive(addr)
        if site is None or revive:
            try:
                plan = self._backend.plan_probe(self.original_text, addr)
            except UnsteppableError as err:
                raise KprobeError(err.errno, f"{self._kernel.format_addr(addr)}: cannot "
                                             f"single-step: {err.reason}") from None
        else:
            plan = site.plan
        if kind in ("r", "j"):
            sym = self._kernel.kallsyms.containing(addr)
            if addr != sym.addr:
                what = "kretprobe" if kind == "r" else "jprobe"
                raise KprobeError(E.EINVAL, f"{what} must be at a function entry, not "
                                            f"{self._kernel.format_addr(addr)}")
        if kind == "r" and p._owner.data_size > KRETPROBE_MAX_DATA_SIZE:
            raise KprobeError(E.E2BIG, f"data_size {p._owner.data_size} exceeds "
                                       f"{KRETPROBE_MAX_DATA_SIZE}")
        if kind == "j" and site is not None and site.jprobe() is not None:
            raise KprobeError(E.EEXIST, f"a jprobe is already registered at "
                                        f"{self._kernel.format_addr(addr)}")
        # All checks passed: from here on nothing can fail half-way (running out of
        # instruction slots fails before any change).
        if site is None or revive:
            old = site
            site = AggrKprobe(addr, plan, plan.orig[:len(self._bp)])
            if old is not None:
                site.children = old.children
            if plan.kind is StepKind.OUT_OF_LINE:
                stride = self._slot_stride
                try:
                    slot = await self.slots.get_insn_slot()
                except MemoryError:         # before any change: nothing to undo
                    raise KprobeError(E.ENOMEM, f"{self._kernel.format_addr(addr)}: out of "
                                                f"instruction slots (unregister some probes "
                                                f"first)") from None
                site.set_slot(slot, stride)
                code = self._backend.slot_code(plan, site.slot, boost=False)
                boosted = self._backend.slot_code(plan, site.slot + stride, boost=True)
                await self._kernel.text_poke_batch([(site.slot, code),
                                                    (site.slot + stride, boosted)])
                self._by_slot[site.slot] = site
            self._kprobe_table[addr] = site
        p.addr = addr
        p.flags &= ~KPROBE_FLAG_GONE
        # Newest first; a jprobe always last (it ends the pre_handler chain).
        if kind == "j":
            site.children = (*site.children, p)
        else:
            site.children = (p, *site.children)
        site.refresh()
        p._registered = True
        p._kprobes = self
        self.generation += 1
        # Remembered for kprobes/list: a GONE probe's module symbols are gone too.
        p._where = self._kernel.symbolize(addr)
        self._kernel.trace_event("register", kind, addr, self._kernel.now_ns())
        if self.enabled and site.enabled() and not site.armed:
            await self.arm_kprobes([site])
        await self.optimizer.update([addr])

    async def arm_kprobes(self, sites: list[AggrKprobe]) -> None:
        await self.optimizer.unoptimize_covering(sites)
        patches = []
        for s in sites:
            s.armed = True
            patches.append((s.addr, self._bp))
        await self._kernel.text_poke_batch(patches)
        self.events.publish(KprobesArmed(sites))

    async def disarm_kprobes(self, sites: list[AggrKprobe]) -> None:
        patches = []
        for s in sites:
            s.armed = False
            if not s.gone:
                patches.append((s.addr, s.orig))
        await self._kernel.text_poke_batch(patches)
        self.events.publish(KprobesDisarmed(sites))

    # == unregistration ==================================================================
    async def unregister_kprobe(self, p: Kprobe) -> None:
        await self._unregister_batch([p], Kprobe)

    async def unregister_kprobes(self, probes) -> None:
        await self._unregister_batch(as_list(probes, Kprobe), Kprobe)

    async def unregister_jprobe(self, jp: Jprobe) -> None:
        await self._unregister_batch([jp], Jprobe)

    async def unregister_jprobes(self, jps) -> None:
        await self._unregister_batch(as_list(jps, Jprobe), Jprobe)

    async def unregister_kretprobe(self, rp: Kretprobe) -> None:
        await self._unregister_batch([rp], Kretprobe)

    async def unregister_kretprobes(self, rps) -> None:
        await self._unregister_batch(as_list(rps, Kretprobe), Kretprobe)

    async def _unregister_batch(self, items: list, cls: type) -> None:
        check_unregister_batch(items, cls, self)
        if not items:
            return
        await self._kernel.host_turn(("unregister", cls.__name__, _describe(items)))
        async with self._mutex:
            check_unregister_batch(items, cls, self)
            # Disarm, grace period, free: the kernel cannot be interrupted in between.
            with trio.CancelScope(shield=True):
                await self._unregister_many([self._kp_of(x) for x in items])
                if cls is Kretprobe:
                    for rp in items:
                        self._cleanup_kretprobe(rp)

    async def _unregister_many(self, probes: list[Kprobe]) -> None:
        """Top half for all (unlink, disarm), one grace period, bottom half for all."""
        # Optimized probes among them go back to plain kprobes first, while still linked
        # (a CPU may hit their breakpoints meanwhile); survivors are re-checked at the end.
        opt = self.optimizer
        unopt = []
        for p in probes:
            op = opt.ops.get(p.addr) if p._registered else None
            if op is not None and op not in unopt:
                unopt.append(op)
        if unopt:
            await opt.unoptimize(unopt)
        dead_sites: list[AggrKprobe] = []
        to_disarm: list[AggrKprobe] = []
        valid = []
        for p in probes:
            site = self._kprobe_table.get(p.addr) if p._registered else None
            if site is None or p not in site.children:
                p.addr = None          # an "incorrect" probe
                continue
            valid.append(p)
            site.children = tuple(c for c in site.children if c is not p)
            site.refresh()
            if not site.children:
                del self._kprobe_table[site.addr]
                dead_sites.append(site)
                if site.armed:
                    to_disarm.append(site)
            elif site.armed and not site.enabled():
                to_disarm.append(site)
        if not valid:
            return
        if to_disarm:
            await self.disarm_kprobes(to_disarm)
        await self._kernel.synchronize()
        if dead_sites and self.events.wants(KprobesFreed):
            self.events.publish(KprobesFreed(dead_sites))
        for site in dead_sites:
            if site.slot is not None:
                del self._by_slot[site.slot]
                self.slots.free_insn_slot(site.slot, dirty=site.boost_used)
                site.set_slot(None)
        self.generation += 1
        for p in valid:
            p._registered = False
            p._kprobes = None
            self._kernel.trace_event("unregister", p._type, p.addr, self._kernel.now_ns())
        await opt.update(sorted({p.addr for p in valid}))

    # == enable / disable ================================================================
    async def enable_kprobe(self, p: Kprobe) -> None:
        self._registered_site(p)
        await self._kernel.host_turn(("enable", _describe([p])))
        async with self._mutex:
            site = self._registered_site(p)
            if p.gone:
                raise KprobeError(E.EINVAL, f"{p!r} is gone (its module text was freed)")
            p.flags &= ~KPROBE_FLAG_DISABLED
            site.refresh()
            if self.enabled and site.enabled() and not site.armed:
                await self.arm_kprobes([site])
            await self.optimizer.update([site.addr])

    async def disable_kprobe(self, p: Kprobe) -> None:
        self._registered_site(p)
        await self._kernel.host_turn(("disable", _describe([p])))
        async with self._mutex:
            site = self._registered_site(p)
            p.flags |= KPROBE_FLAG_DISABLED
            site.refresh()
            if site.addr in self.optimizer.ops and not site.enabled():
                await self.optimizer.unoptimize([self.optimizer.ops[site.addr]])
            if site.armed and not site.enabled():
                await self.disarm_kprobes([site])
            await self.optimizer.update([site.addr])

    def _registered_site(self, p: Kprobe) -> AggrKprobe:
        if not isinstance(p, Kprobe):
            raise TypeError(f"expected a Kprobe (for a Kretprobe or Jprobe, its .kp), not "
                            f"{type(p).__name__}")
        if p._registered and p._kprobes is not self:
            raise KprobeError(E.EINVAL, f"{p!r} is registered on another machine")
        site = self._kprobe_table.get(p.addr) if p._registered else None
        if site is None:
            raise KprobeError(E.EINVAL, f"{p!r} is not registered")
        return site

    async def set_enabled(self, enabled: bool) -> None:
        """kprobes/enabled: arm or disarm every probe, on all CPUs, before returning."""
        await self._kernel.host_turn(("kprobes/enabled", enabled))
        async with self._mutex:
            if enabled == self.enabled:
                return
            self.enabled = enabled
            opt = self.optimizer
            if enabled:
                await self.arm_kprobes([s for s in self._sorted_sites()
                                        if s.enabled() and not s.armed])
                await opt.update(sorted(self._kprobe_table))
            else:
                unopt = [opt.ops[a] for a in sorted(opt.ops)]
                if unopt:
                    await opt.unoptimize(unopt)
                await self.disarm_kprobes([s for s in self._sorted_sites() if s.armed])

    def _text_alive(self, addr: int) -> bool:
        """`addr` is kernel text, or text of a loaded module (not freed init text)."""
        if self._kernel_text[0] <= addr < self._kernel_text[1]:
            return True
        module = self._kernel.module_of(addr)
        return module is not None and not (module.in_init(addr) and module.init_freed)

    def _sorted_sites(self) -> list[AggrKprobe]:
        return [self._kprobe_table[a] for a in sorted(self._kprobe_table)]

    # == host writes to text ==============================================================
    def _text_write_guard(self, addr: int, size: int) -> None:
        """A host write into text (m.write_memory, m.text_poke) may not overwrite an armed
        probe's bytes: the probe would die silently and its unregister would write the old
        byte over the new code (EBUSY, as the kernel's text_poke users check)."""
        n = len(self._bp)
        for a in range(addr - n + 1, addr + size):
            site = self._kprobe_table.get(a)
            if site is not None and site.armed:
                raise KprobeError(E.EBUSY, f"writing {size} byte(s) at {addr:#x} would "
                                           f"overwrite the armed probe at "
                                           f"{self._kernel.format_addr(a)}; unregister it first")

    # == modules =========================================================================
    def kprobes_module_callback(self, event: ModuleGoing) -> None:
        """Module text is going away: its probes are killed (kill_kprobe)."""
        module = event.module
        in_range = module.in_init if event.what == "init_freed" else \
            (lambda a: module.in_text(a) or module.in_init(a))
        for site in self._sorted_sites():
            if not in_range(site.addr) or site.gone:
                continue
            self.generation += 1
            # kill_kprobe: the text is gone, so it is not restored.
            self.optimizer.kill(site)
            site.gone = True
            site.armed = False
            for c in site.children:
                c.flags |= KPROBE_FLAG_GONE
            site.refresh()
            if site.slot is not None:
                del self._by_slot[site.slot]
                self.slots.free_insn_slot(site.slot, dirty=True)
                site.set_slot(None)

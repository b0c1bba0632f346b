"""Jump-optimized kprobes: the detour, the optimizer and the knob.

How a probe becomes optimized (kernel/kprobes.c `optimize_kprobe`, `kprobe_optimizer`;
arch/x86/kernel/kprobes/opt.c), here:

  1. `update(site)` - called by the registry whenever a site's probes change - asks the
     safety checks (`_optcheck`).  A site that passes gets a detour (a stub and a buffer in
     the optinsn area, see cpus/_optprobe.py), is flagged (`site.detour`) and queued.  From
     now on a breakpoint hit at the site is sent to the stub rather than single-stepped
     (setup_detour_execution), so no CPU enters the region's middle any more.
  2. The optimizer, a deferred worker, takes the whole queue as one batch, waits for a grace
     period and then, RCU-tasks style, until no CPU and no preempted task is still inside a
     queued region.  Only then does it write the jumps, int3 first: the breakpoint on the
     first byte (already there), sync; the tail bytes, sync; the jump's first byte, sync.
  3. A hit now runs the jump, then the stub, whose single instruction carries a code hook:
     `optimized_callback` runs the pre_handlers as an aggregate does, with the per-CPU
     current_kprobe and the reentrancy rule (a hit while another probe runs on this CPU
     only counts nmissed).  The PC is never written: the stub jumps on into the copied
     region, which jumps back.  A pre_handler's change of `regs.ip` is ignored, as in
     Linux; a probe that must redirect needs a post_handler (even an empty one) or the
     sysctl off, which is what Documentation/trace/kprobes.rst tells its users too.

Unoptimizing (a post_handler arrives, a probe is disabled or unregistered, another probe
lands in the region, the sysctl is turned off) restores the region, int3 first again, and
leaves the breakpoint: the site is a plain kprobe once more.  The detour is freed only
after a grace period and once no task is preempted inside it.
"""

from __future__ import annotations

import errno as E
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from smpkprobes.cpus._optprobe import detour_layout, opt_facts

from .._errors import KprobeError, SimulationError
from ..machine._services import ModuleGoing, QuantumEnded, resume_at
from ._optcheck import NotOptimizable, prepare_region, site_blockers
from ._probes import KPROBE_FLAG_DISABLED, KPROBE_FLAG_GONE
from ._state import _HIT_ACTIVE, _NONE

# kprobe_disabled(): a child whose handlers do not run.
_OFF = KPROBE_FLAG_DISABLED | KPROBE_FLAG_GONE

if TYPE_CHECKING:    # pragma: no cover
    from ._state import AggrKprobe

# The optinsn area: stubs first (the code hook covers exactly them), then the buffers.
STUB_AREA = 0x10000
# wait_for_kprobe_optimizer's checks of a batch standing still with nothing holding it back
# before it reports the optimizer stalled.
OPTIMIZER_STALL_CHECKS = 200


@dataclass
class OptimizedKprobe:
    """`struct optimized_kprobe`: one site's detour and where it stands."""

    site: "AggrKprobe"
    region_end: int
    index: int
    stub: int
    buffer: int
    jump: bytes
    saved: bytes                    # the region's original bytes (copied_insn)
    unoptimized_at: int = -1        # the grace period count when it was unoptimized
    # queued -> optimized; or unoptimizing -> unoptimized (its detour awaiting the free)
    state: str = "queued"
    written: bool = False           # some byte of the jump past the first is in the text
    text: bytes = b""               # what the optimizer has put where the jump goes


@dataclass
class _Batch:
    """One run of the optimizer: the probes it optimizes and the detours it frees."""

    ops: list
    frees: list
    phase: str = "gp"               # gp -> int3 -> tail -> first
    remaining: set = field(default_factory=set)     # CPUs still to pass a quiescent state
    ranges: list = field(default_factory=list)      # where no task may be (RCU tasks)
    pending: list = field(default_factory=list)     # (cpu, IPI) of the last patch


@dataclass(frozen=True)
class OptStatistics:
    optimized: int
    unoptimized: int
    optimizing: int


class Optimizer:
    """The optprobe half of the probe core, owned by `KprobesSubsystem` (`k.optimizer`)."""

    def __init__(self, kprobes, kernel):
        self._k = kprobes
        self._kernel = kernel
        self._backend = kernel.backend
        self._bp = kernel.backend.breakpoint
        self._area = kernel.optinsn_area[0]
        self.facts = opt_facts(kernel.backend)
        self.enabled = True                 # debug.kprobes-optimization
        self._regions: dict[int, tuple | str] = {}     # addr -> plans, or why not
        self.ops: dict[int, OptimizedKprobe] = {}       # by site address
        self._by_stub: dict[int, OptimizedKprobe] = {}
        self._queue: list[OptimizedKprobe] = []
        self._free_list: list[OptimizedKprobe] = []
        self._free_index: list[int] = []
        self._next_index = 0
        self._batch: _Batch | None = None
        self._busy = False
        self.unoptimized = 0                # sites that passed the checks but are not optimized
        self.patches = 0
        if self.facts is None:
            return
        self._stub_count = STUB_AREA // self.facts.stub_size
        tramp = kprobes._trampoline
        self._per_cpu = tuple(_CpuDetours(self, kprobes, kernel, cpu) for cpu in kernel.cpus)
        for cpu, this in zip(kernel.cpus, self._per_cpu):
            cpu.add_code_hook(self._area, self._area + STUB_AREA, this.optimized_callback)
            # The kretprobe trampoline's first instruction (its breakpoint), see
            # kretprobe_trampoline_callback.
            cpu.add_code_hook(tramp, tramp + 1, this.kretprobe_trampoline_callback)
        # A CPU in a detour is not quiescent, but may be preempted there (RCU tasks).
        kernel.register_unquiescent_text(*kernel.optinsn_area, preemptible=True)
        kernel.subscribe(QuantumEnded, self._on_quantum)
        # A module's text comes and goes: what the checks found there goes with it.
        kernel.subscribe(ModuleGoing, lambda event: self._regions.clear())

    # == the hit: one code hook on the stub, one on the trampoline, per CPU ===============
    # (_CpuDetours below: each CPU's hooks are bound to that CPU's control block and regs.)

    # == deciding =======================================================================
    def region(self, addr: int):
        """Checks 1-4, once per address: the region's plans, or the reason it fails."""
        r = self._regions.get(addr)
        if r is None:
            sym = self._kernel.kallsyms.containing(addr)
            try:
                r = prepare_region(self._backend, self.facts, self._k.original_text,
                                   sym.addr, sym.size, addr)
            except NotOptimizable as err:
                r = err.reason
            self._regions[addr] = r
        return r

    def why_not(self, site) -> str | None:
        """Why `site` is not to be optimized now, or None if it is."""
        if self.facts is None:
            return "this architecture has no optprobes"
        if not self.enabled:
            return "debug.kprobes-optimization is 0"
        if not site.armed or site.gone:
            return "not armed"
        r = self.region(site.addr)
        if isinstance(r, str):
            return r
        end = r[-1].addr + r[-1].length
        return site_blockers(site, end, self._probed)

    def _probed(self, lo: int, hi: int) -> bool:
        table = self._k._kprobe_table
        return any(a in table for a in range(lo, hi))

    async def update(self, addrs) -> None:
        """Bring the optimization of the sites at `addrs`, and of those whose region covers
        one of them, in line with their probes (under kprobe_mutex): queue the ones that may
        be optimized, unoptimize at once the ones that may not."""
        if self.facts is None:
            return
        table = self._k._kprobe_table
        wanted = set()
        for addr in addrs:
            wanted.update(a for a in range(addr - self.facts.jump_len + 1, addr + 1)
                          if a in table)
        sites = [table[a] for a in sorted(wanted)]
        drop = []
        for site in sites:
            want = self.why_not(site) is None and site.children
            op = self.ops.get(site.addr)
            if op is not None and (not want or op.site is not site):
                drop.append(op)
            elif op is None and want:
                await self._prepare(site)
        if drop:
            await self.unoptimize(drop)
        self.unoptimized = sum(1 for s in self._k._kprobe_table.values()
                               if s.addr not in self.ops and s.armed
                               and not isinstance(self.region(s.addr), str))

    async def _prepare(self, site) -> None:
        """arch_prepare_optimized_kprobe + optimize_kprobe: build the detour, flag, queue."""
        plans = self.region(site.addr)
        if self._free_index:
            index = self._free_index.pop()
        elif self._next_index < self._stub_count:
            index = self._next_index
            self._next_index += 1
        else:
            return                          # out of detours: stays a plain kprobe
        f = self.facts
        stub = self._area + index * f.stub_size
        buffer = self._area + STUB_AREA + index * f.buffer_size
        lay = detour_layout(self._backend, f, plans, stub, buffer)
        end = plans[-1].addr + plans[-1].length
        if not (f.in_reach(site.addr, stub) and f.in_reach(buffer, end)):
            self._free_index.append(index)
            return
        await self._kernel.text_poke_batch([(stub, lay.stub_code), (buffer, lay.buffer_code)])
        op = OptimizedKprobe(site, end, index, stub, buffer, f.encode_jump(site.addr, stub),
                             self._k.original_text(site.addr, end - site.addr))
        op.text = self._bp + op.saved[len(self._bp):f.jump_len]
        self.ops[site.addr] = op
        self._by_stub[stub] = op
        site.detour = resume_at(stub)
        self._queue.append(op)
        self._kernel.trace_event("opt_queue", site.addr, self._kernel.now_ns())
        self._kick()

    # == the optimizer (kprobe_optimizer) ===================================================
    # A deferred worker that runs between quanta, driven by the conductor (a quantum
    # notifier), never as a host task of its own: its grace periods, IPIs and patches then
    # fall at points the seed alone decides, as everything else in the machine does.
    def _kick(self) -> None:
        """Work was queued: the optimizer takes it up after the next quantum (a deferred
        worker, as the kernel's runs OPTIMIZE_DELAY later)."""
        self._busy = True

    def _on_quantum(self, event: QuantumEnded) -> None:
        if not self._busy:
            return
        b = self._batch
        if b is not None and b.phase == "gp" and b.remaining:
            m = self._kernel
            cpu = event.cpu
            if cpu.id in b.remaining and m.quiescent(cpu):
                b.remaining.discard(cpu.id)
            for other in m.cpus:
                if other.current is None and not other.deferred_trap:
                    b.remaining.discard(other.id)
        self._step()

    def _step(self) -> None:
        m = self._kernel
        while True:
            b = self._batch
            if b is None:
                if not self._queue and not self._free_list:
                    self._busy = False
                    return
                b = self._batch = _Batch(list(self._queue), self._free_list)
                self._queue, self._free_list = [], []
                gps = m.completed_grace_periods()
                if b.ops or any(op.unoptimized_at >= gps for op in b.frees):
                    b.remaining = {c.id for c in m.cpus if c.online and not m.quiescent(c)}
                b.ranges = [(op.site.addr + 1, op.region_end) for op in b.ops] + \
                    [(op.buffer, op.buffer + self.facts.buffer_size) for op in b.frees] + \
                    [(op.stub, op.stub + self.facts.stub_size) for op in b.frees]
                m.trace_event("opt_gp_begin", len(b.ops), len(b.frees), m.now_ns())
            if b.phase == "gp":
                if b.remaining or self._holdout(b.ranges):
                    return
                m.trace_event("opt_gp_end", m.now_ns())
                for op in b.frees:
                    del self._by_stub[op.stub]
                    self._free_index.append(op.index)
                b.frees = []
                self._poke(b, "int3" if self.facts.jump_len > len(self._bp) else "tail")
            elif any(x is e for c, e in b.pending for x in c.pending_flush):
                return
            elif b.phase == "int3":
                self._poke(b, "tail")
            elif b.phase == "tail":
                self._poke(b, "first")
            else:
                for op in b.ops:
                    if op.state == "queued":
                        op.state = "optimized"
                        m.trace_event("opt_patch", op.site.addr, m.now_ns())
                self.patches += 1
                self._batch = None

    def _poke(self, b: "_Batch", phase: str) -> None:
        """text_poke_bp, one step: the breakpoint on every first byte ("int3"), the tail
        bytes ("tail"), then the jump's first bytes ("first"); each waits for its IPIs."""
        n = len(self._bp)
        ops = [op for op in b.ops if op.state == "queued"]
        b.phase = phase
        if phase == "int3":
            patches = [(op.site.addr, self._bp) for op in ops]
            for op in ops:
                op.text = self._bp + op.text[n:]
        elif phase == "tail":
            if self.facts.jump_len == n:
                b.phase = phase = "first"       # one instruction: a single atomic write
                patches = [(op.site.addr, op.jump) for op in ops]
            else:
                patches = [(op.site.addr + n, op.jump[n:]) for op in ops]
                for op in ops:
                    op.written = True
                    op.text = op.text[:n] + op.jump[n:]
        else:
            patches = [(op.site.addr, op.jump[:n]) for op in ops]
        if phase == "first":
            for op in ops:
                op.written = True
                op.text = op.jump
        b.pending = self._kernel.text_poke_start(patches)[1] if patches else []
        if phase == "first":
            for op in ops:
                # The tail was written alone: tell the CPUs' block counter where
                # instructions start now (one jump, then none to the region's end).
                self._kernel.code_written(op.site.addr, op.jump)

    def _holdout(self, ranges) -> bool:
        """RCU tasks: is a CPU, or a preempted task, still inside one of `ranges`?"""
        m = self._kernel
        pcs = [cpu.pc for cpu in m.cpus if cpu.current is not None]
        pcs += m.preempted_task_pcs()
        return any(lo <= pc < hi for pc in pcs for lo, hi in ranges)

    async def unoptimize(self, ops) -> None:
        """Restore the regions of `ops` (int3 first, the breakpoint stays) and hand their
        detours to the optimizer for freeing after a grace period."""
        m = self._kernel
        bp = self._bp
        n = len(bp)
        for op in ops:
            op.state = "unoptimizing"
        written = [op for op in ops if op.written and not op.site.gone]
        if written:
            for op in written:
                op.text = bp + op.text[n:]
            await m.text_poke_batch([(op.site.addr, bp) for op in written])
            if self.facts.jump_len > n:
                sync = m.text_poke_start([(op.site.addr + n, op.saved[n:self.facts.jump_len])
                                          for op in written])
                for op in written:
                    op.text = bp + op.saved[n:self.facts.jump_len]
                # The tail was written alone: where instructions start is the region's
                # own decode again (the CPUs' block counter reads it).
                for op in written:
                    m.code_written(op.site.addr, op.saved)
                await m.text_poke_finish(*sync)
        gps = m.completed_grace_periods()
        for op in ops:
            op.state = "unoptimized"
            op.unoptimized_at = gps
            op.site.detour = None
            del self.ops[op.site.addr]
            m.trace_event("unopt", op.site.addr, m.now_ns())
        self._queue = [op for op in self._queue if op.state == "queued"]
        self._free_list.extend(ops)
        self._kick()

    async def unoptimize_covering(self, sites) -> None:
        """Before breakpoints go on `sites`: unoptimize every optimized probe whose region
        holds one of them (__arm_kprobe's get_optimized_kprobe), so that restoring the
        region cannot wipe the new breakpoint."""
        if self.facts is None or not self.ops:
            return
        hit = []
        for site in sites:
            for a in range(site.addr - self.facts.jump_len + 1, site.addr):
                op = self.ops.get(a)
                if op is not None and site.addr < op.region_end and op not in hit:
                    hit.append(op)
        if hit:
            await self.unoptimize(hit)

    def copied_insn_origin(self, pc: int) -> int | None:
        """The original address of the instruction copied at `pc` in a live detour buffer
        (each copy keeps its original's length, so offsets match), or None."""
        f = self.facts
        off = pc - (self._area + STUB_AREA)
        if f is None or off < 0:
            return None
        index, k = divmod(off, f.buffer_size)
        op = self._by_stub.get(self._area + index * f.stub_size)
        if op is None or k >= op.region_end - op.site.addr:
            return None
        return op.site.addr + k

    def kill(self, site) -> None:
        """kill_optimized_kprobe: the site's text is gone (module unload)."""
        op = self.ops.pop(site.addr, None)
        if op is not None:
            op.state = "unoptimized"
            op.unoptimized_at = self._kernel.completed_grace_periods()
            site.detour = None
            self._queue = [o for o in self._queue if o is not op]
            self._free_list.append(op)
            self._kick()

    async def wait_for_kprobe_optimizer(self) -> None:
        """Return once the optimizer has nothing left to do (wait_for_kprobe_optimizer).
        It advances between quanta, so the machine runs meanwhile.

        Linux waits for as long as it takes, and so does this, while anything may hold the
        optimizer back: a CPU that is not quiescent, or a task inside a queued region.
        But if its batch stands still through OPTIMIZER_STALL_CHECKS checks in a row at
        each of which every CPU was quiescent and no task was in a region, nothing can
        move it any more (a broken optimizer): that is a SimulationError, recorded and
        printed as the kernel's BUG reports are, instead of a wait for ever."""
        m = self._kernel
        still = 0
        last = None
        while self._busy:
            await m.sleep_ns(1000)
            b = self._batch
            where = None if b is None else (id(b), b.phase, tuple(sorted(b.remaining)),
                                             len(b.pending))
            if where is not None and where == last and self._nothing_holds(b):
                still += 1
                if still >= OPTIMIZER_STALL_CHECKS:
                    msg = (f"kprobe optimizer stalled: its batch of {len(b.ops)} probe(s) "
                           f"stayed in phase {b.phase!r} (waiting for CPUs "
                           f"{sorted(b.remaining)}) through {still} checks with every CPU "
                           f"quiescent and no task in a region")
                    self._k.simulation_errors.append(msg)
                    m.printk(msg)
                    raise SimulationError(msg)
            else:
                still = 0
            last = where

    def _nothing_holds(self, b: "_Batch") -> bool:
        """Every CPU quiescent, and no CPU nor preempted task inside the batch's ranges:
        the machine's facts, read here rather than through _holdout, so that the stall
        check does not trust the code whose stall it checks."""
        m = self._kernel
        if not all(m.quiescent(cpu) for cpu in m.cpus):
            return False
        pcs = [cpu.pc for cpu in m.cpus if cpu.current is not None] + m.preempted_task_pcs()
        return not any(lo <= pc < hi for pc in pcs for lo, hi in b.ranges)

    def statistics(self) -> OptStatistics:
        opt = sum(1 for op in self.ops.values() if op.state == "optimized")
        return OptStatistics(optimized=opt, unoptimized=self.unoptimized,
                             optimizing=sum(1 for op in self.ops.values() if op.state == "queued"))

    def recover(self, buf: bytearray, addr: int) -> None:
        """__recover_optprobed_insn: put back in `buf` (text read at `addr`) the original
        bytes under every jump that is or may be written."""
        end = addr + len(buf)
        for op in self.ops.values():
            a = op.site.addr
            saved = op.saved[:self.facts.jump_len]
            if a < end and addr < a + len(saved):
                for i, byte in enumerate(saved):
                    if addr <= a + i < end:
                        buf[a + i - addr] = byte

    def jump_text(self, addr: int, size: int) -> bytes | None:
        """The `size` bytes the optimizer has put at `addr` where a jump goes (the jump, or a
        step of writing or removing it: text_poke_bp's breakpoint, then the operand), or
        None where it has written nothing."""
        if self.facts is None:
            return None
        for a in range(addr - self.facts.jump_len + 1, addr + 1):
            op = self.ops.get(a)
            if op is not None and (op.written or op.state == "optimized"):
                i = addr - a
                return op.text[i:i + size]
        return None

    def expected_text(self, addr: int, want: bytes) -> bytes:
        """What the text at `addr` must hold: `want`, unless the optimizer has written
        where a jump goes (`jump_text`)."""
        got = self.jump_text(addr, len(want))
        return want if got is None else got

    def is_optimized(self, addr: int) -> bool:
        op = self.ops.get(addr)
        return op is not None and op.state == "optimized"

    # == debug.kprobes-optimization ======================================================
    async def set_enabled(self, on: bool) -> None:
        async with self._k._mutex:
            if on == self.enabled:
                return
            self.enabled = on
            if on:
                await self.update(sorted(self._k._kprobe_table))
            else:
                ops = [self.ops[a] for a in sorted(self.ops)]
                if ops:
                    await self.unoptimize(ops)
                await self.update([])


class Sysctl:
    """`m.sysctl`: /proc/sys, as far as kprobes have knobs in it."""

    _KEY = "debug/kprobes-optimization"

    def __init__(self, optimizer: Optimizer):
        self._opt = optimizer

    def read(self, path: str) -> str:
        if path != self._KEY:
            raise KprobeError(E.ENOENT, f"no sysctl {path!r}")
        return "1\n" if self._opt.enabled else "0\n"

    async def write(self, path: str, value: str) -> None:
        if path != self._KEY:
            raise KprobeError(E.ENOENT, f"no sysctl {path!r}")
        v = value.strip()
        if v not in ("0", "1"):
            raise KprobeError(E.EINVAL, f"{path} takes 0 or 1, not {value!r}")
        await self._opt.set_enabled(v == "1")


class _CpuDetours:
    """One CPU's side of the optimized hit: its two code hooks, with what they use of this
    CPU looked up once (this_cpu_ptr): the control block, the saved-registers view, the
    probe core's counters and the event trace.  A hit costs what these two functions' own
    lines cost; the bare code hook is the yardstick (`smpkprobes bench kprobe`)."""

    __slots__ = ("_opt", "_cpu", "_kcb", "_regs", "_k", "_trace", "_by_stub")

    def __init__(self, opt: Optimizer, kprobes, kernel, cpu):
        self._opt = opt
        self._cpu = cpu
        self._kcb = kprobes.kprobe_ctlblk[cpu.id]
        # The detour's pt_regs frame on this CPU's stack: one view, emptied for each hit
        # (valid inside the handlers, as pt_regs is).
        self._regs = kprobes._Regs(cpu)
        self._k = kprobes
        self._trace = kernel.trace
        self._by_stub = opt._by_stub            # (the optimizer's dict, never rebound)

    def optimized_callback(self, addr: int) -> bool:
        """optimized_callback: the hot path of an optimized probe, written out in one
        function on purpose (as the trap path's kprobe_int3_handler is).  Returns whether
        the quantum ends now (a handler's nested call asked for it)."""
        cpu = self._cpu
        op = self._by_stub.get(addr)
        if op is None:
            return cpu.stop_requested
        k = self._k
        site = op.site
        p_addr = site.addr
        k.traps += 1
        kcb = self._kcb
        if kcb.current_kprobe is not None:
            for child in site.children:
                child.nmissed += 1
            k.missed += 1
            self._trace.append(("miss", cpu.id, p_addr, cpu.clock + cpu.intra))
            return cpu.stop_requested
        cpu.preempt_count += 1
        kcb.current_kprobe = site
        kcb.kprobe_status = _HIT_ACTIVE
        k.hits += 1
        self._trace.append(("opt", cpu.id, p_addr, cpu.clock + cpu.intra))
        regs = self._regs
        regs._pc = p_addr
        if regs._cache is not None:       # (a handler of an earlier hit read or wrote it)
            regs._cache = regs._dirty = None
        for child in site.children:                     # opt_pre_handler
            if not child._registered:
                k.stale_handlers.append((p_addr, child, "pre_handler"))
            # kprobe_disabled(): a disabled child, or a GONE one beside a revived aggregate
            pre = child.pre_handler
            if pre is None or child.flags & _OFF:
                continue
            try:
                ret = pre(child, regs)
            except BaseException as exc:
                if not k.kprobe_fault_handler(cpu, child, regs, exc):
                    return cpu.stop_requested
                continue
            if kcb.current_kprobe is None:
                return cpu.stop_requested     # the task died inside the handler
            if ret:
                break                     # regs.ip is ignored on an optimized probe
        if regs._dirty:
            regs.flush_except_pc()
        kcb.current_kprobe = None        # reset_current_kprobe (nothing else was set)
        kcb.kprobe_status = _NONE
        cpu.preempt_count -= 1
        if cpu.stop_requested:
            # A handler's nested call ends this quantum inside the hook: resume past the
            # stub (it only jumps to the buffer), or its hook would run the handlers again.
            cpu.pc = op.buffer
            return True
        return False

    # == the return side: the kretprobe trampoline, trap-free ==============================
    def kretprobe_trampoline_callback(self, addr: int) -> bool:
        """__kretprobe_trampoline: a function with a return probe returned into the
        trampoline.  While jump optimization is on, the trampoline is code, as x86's is
        (it saves the registers and calls trampoline_handler, no int3): a code hook on its
        first instruction runs the same trampoline_handler as the breakpoint would, then
        sends the CPU to the real return address before the breakpoint executes.  With the
        sysctl off this returns at once and the breakpoint traps, as in the kernels the
        kprobes document measured (and as ppc's and sparc64's trampoline probes do)."""
        cpu = self._cpu
        if not self._opt.enabled:
            return cpu.stop_requested
        # An entry into the kernel as a hypercall's is: it costs what a trap costs in
        # virtual time (the timeline is the trapping one's), only no trap is taken.
        cpu.intra += cpu.trap_cost
        resume = self._k.kretprobe_trampoline_handler(cpu, self._kcb)
        if resume is not None:
            cpu.pc = resume
        # (None: the task died, and the oops stopped the CPU before the breakpoint.)
        return cpu.stop_requested

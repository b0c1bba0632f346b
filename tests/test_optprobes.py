"""Jump-optimized kprobes (smpkprobes/kprobes/_optprobe.py): a probe that passes the safety
checks is hit through a detour, without a trap, and falls back to a plain kprobe whenever
it may not be optimized."""

import errno

import pytest
import trio

from smpkprobes import Kprobe, KprobeError, Machine, SimulationError
from smpkprobes.kprobes._core import KprobesSubsystem
from smpkprobes.kprobes._optprobe import Optimizer

OFF = 4          # kprobe_target+4 on x86_64: mov ecx, edi; mov eax, imm32 (a region of 2)


async def _optimized(m, **kw):
    kp = Kprobe(symbol_name="kprobe_target", offset=OFF, **kw)
    await m.kprobes.register_kprobe(kp)
    await m.kprobes.optimizer.wait_for_kprobe_optimizer()
    return kp


def _jump(m, addr):
    return m.read_memory(addr, 5)


async def test_sysctl_default_and_errors():
    """debug/kprobes-optimization reads "1\\n" by default; it takes 0 or 1 only."""
    async with Machine(cpus=1) as m:
        assert m.sysctl.read("debug/kprobes-optimization") == "1\n"
        with pytest.raises(KprobeError, match="takes 0 or 1") as e:
            await m.sysctl.write("debug/kprobes-optimization", "2")
        assert e.value.errno == errno.EINVAL
        with pytest.raises(KprobeError, match="no sysctl") as e:
            m.sysctl.read("debug/nope")
        assert e.value.errno == errno.ENOENT
        with pytest.raises(KprobeError, match="no sysctl"):
            await m.sysctl.write("debug/nope", "1")
        await m.sysctl.write("debug/kprobes-optimization", "0\n")
        assert m.sysctl.read("debug/kprobes-optimization") == "0\n"


async def test_queued_then_optimized_with_a_jump():
    """Registered: queued (optimizing); after the optimizer: a jmp rel32 to the detour,
    [OPTIMIZED] in kprobes/list, and the statistics say so."""
    async with Machine(cpus=2, seed=1) as m:
        kp = Kprobe(symbol_name="kprobe_target", offset=OFF, pre_handler=lambda p, r: 0)
        await m.kprobes.register_kprobe(kp)
        s = m.kprobes.statistics()
        assert (s.optimized, s.unoptimized, s.optimizing) == (0, 0, 1)
        await m.kprobes.optimizer.wait_for_kprobe_optimizer()
        s = m.kprobes.statistics()
        assert (s.optimized, s.unoptimized, s.optimizing) == (1, 0, 0)
        op = m.kprobes.optimizer.ops[kp.addr]
        assert _jump(m, kp.addr) == b"\xe9" + (op.stub - kp.addr - 5).to_bytes(4, "little",
                                                                               signed=True)
        assert m.debugfs.read("kprobes/list").endswith("kprobe_target+0x4 [OPTIMIZED]\n")


async def test_optimized_hit_runs_the_pre_handler_without_a_trap():
    """An optimized hit sees regs.ip at the probe and the arguments; no breakpoint trap is
    taken (the trace has an "opt" event and no "hit"); the result is unchanged."""
    async with Machine(cpus=2, seed=1) as m:
        seen = []
        kp = await _optimized(m, pre_handler=lambda p, r: seen.append((r.ip, r.arg(0))))
        start = len(m.trace)
        assert await m.call("kprobe_target", 300) == 100
        kinds = [e[0] for e in list(m.trace)[start:]]
        assert seen == [(kp.addr, 300)] and "opt" in kinds and "hit" not in kinds
        assert m.kprobes.hits == 1 and m.kprobes.statistics().stray_traps == 0


async def test_a_cpu_in_the_detour_is_not_quiescent_but_may_be_preempted_there():
    """After the pre_handlers, the CPU runs the copied instructions in the detour buffer
    with preemption enabled: it is not quiescent there (a grace period may not end while
    it could still return through the buffer), though its task may be switched out there
    (the optimizer waits for such tasks as RCU tasks does)."""
    async with Machine(cpus=2, seed=1) as m:
        kp = await _optimized(m, pre_handler=lambda p, r: 0)
        op = m.kprobes.optimizer.ops[kp.addr]
        cpu = m.cpus[0]
        seen = []

        def in_buffer(addr):
            seen.append((addr, cpu.preemptible(), m.quiescent(cpu)))
            return False
        cpu.add_code_hook(op.buffer, op.buffer + 1, in_buffer)
        assert await m.call("kprobe_target", 300, cpu=0) == 100
        assert seen == [(op.buffer, True, False)]


async def test_ip_change_is_ignored_but_registers_are_not():
    """On an optimized probe a pre_handler's regs.ip is ignored, as in Linux; its other
    register writes take effect (here the argument, read by the next instruction)."""
    async with Machine(cpus=1) as m:
        def pre(p, r):
            r.ip = 0xdead
            r.rdi = 9
            return 1
        await _optimized(m, pre_handler=pre)
        assert await m.call("kprobe_target", 300) == 3


async def test_post_handler_unoptimizes_and_its_removal_reoptimizes():
    """A child with a post_handler turns the site back into a plain kprobe (region restored,
    int3 kept); unregistering that child re-optimizes it."""
    async with Machine(cpus=2, seed=3) as m:
        kp = await _optimized(m, pre_handler=lambda p, r: 0)
        orig = m.kprobes.original_text(kp.addr, 5)
        posts = []
        kp2 = Kprobe(symbol_name="kprobe_target", offset=OFF,
                     post_handler=lambda p, r, f: posts.append(r.ip))
        await m.kprobes.register_kprobe(kp2)
        assert _jump(m, kp.addr) == b"\xcc" + orig[1:]
        assert m.kprobes.statistics().unoptimized == 1
        assert await m.call("kprobe_target", 30) == 10 and len(posts) == 1
        await m.kprobes.unregister_kprobe(kp2)
        await m.kprobes.optimizer.wait_for_kprobe_optimizer()
        assert m.kprobes.optimizer.is_optimized(kp.addr)


async def test_disabling_the_post_handler_child_reoptimizes_and_enabling_it_unoptimizes():
    """disable_kprobe of the aggregate's only child with a post_handler lets the site be
    optimized again (a disabled child's handlers do not count); enable_kprobe takes the
    optimization back; the post_handler runs only while it is enabled."""
    async with Machine(cpus=2, seed=3) as m:
        opt = m.kprobes.optimizer
        kp = await _optimized(m, pre_handler=lambda p, r: 0)
        posts = []
        kp2 = Kprobe(symbol_name="kprobe_target", offset=OFF,
                     post_handler=lambda p, r, f: posts.append(r.ip))
        await m.kprobes.register_kprobe(kp2)
        assert not opt.is_optimized(kp.addr)
        await m.kprobes.disable_kprobe(kp2)
        await opt.wait_for_kprobe_optimizer()
        assert opt.is_optimized(kp.addr)
        assert await m.call("kprobe_target", 30) == 10 and posts == []
        await m.kprobes.enable_kprobe(kp2)
        await opt.wait_for_kprobe_optimizer()
        assert not opt.is_optimized(kp.addr)
        assert await m.call("kprobe_target", 30) == 10 and len(posts) == 1
        await m.kprobes.unregister_kprobes([kp, kp2])


async def test_probe_inside_the_region_unoptimizes():
    """A second probe inside an optimized region unoptimizes the first, and both fire."""
    async with Machine(cpus=1) as m:
        hits = []
        kp = await _optimized(m, pre_handler=lambda p, r: hits.append(p.offset))
        inner = Kprobe(symbol_name="kprobe_target", offset=OFF + 2,
                       pre_handler=lambda p, r: hits.append(p.offset))
        await m.kprobes.register_kprobe(inner)
        await m.kprobes.optimizer.wait_for_kprobe_optimizer()
        assert not m.kprobes.optimizer.is_optimized(kp.addr)
        assert await m.call("kprobe_target", 30) == 10 and hits == [OFF, OFF + 2]
        await m.kprobes.unregister_kprobe(inner)
        await m.kprobes.optimizer.wait_for_kprobe_optimizer()
        assert m.kprobes.optimizer.is_optimized(kp.addr)


async def test_sysctl_off_unoptimizes_everything_and_on_requeues():
    """Writing 0 restores every region and leaves the breakpoints; writing 1 re-queues."""
    async with Machine(cpus=2) as m:
        kp = await _optimized(m, pre_handler=lambda p, r: 0)
        orig = m.kprobes.original_text(kp.addr, 5)
        await m.sysctl.write("debug/kprobes-optimization", "0")
        assert _jump(m, kp.addr) == b"\xcc" + orig[1:]
        assert "[OPTIMIZED]" not in m.debugfs.read("kprobes/list")
        await m.sysctl.write("debug/kprobes-optimization", "1")
        await m.kprobes.optimizer.wait_for_kprobe_optimizer()
        assert m.kprobes.optimizer.is_optimized(kp.addr)


async def test_disable_and_unregister_restore_the_text():
    """Disabling an optimized probe restores the original bytes; enabling re-optimizes;
    unregistering restores them and frees the detour after a grace period."""
    async with Machine(cpus=2) as m:
        orig = m.read_memory(m.kallsyms_lookup_name("kprobe_target") + OFF, 5)
        kp = await _optimized(m, pre_handler=lambda p, r: 0)
        await m.kprobes.disable_kprobe(kp)
        assert _jump(m, kp.addr) == orig
        await m.kprobes.enable_kprobe(kp)
        await m.kprobes.optimizer.wait_for_kprobe_optimizer()
        assert m.kprobes.optimizer.is_optimized(kp.addr)
        addr = kp.addr
        await m.kprobes.unregister_kprobe(kp)
        assert _jump(m, addr) == orig
        await m.kprobes.optimizer.wait_for_kprobe_optimizer()
        assert m.kprobes.optimizer.ops == {} and m.kprobes.optimizer._by_stub == {}


async def test_reentry_counts_nmissed():
    """test_kprobe_missed on an optimized probe: a handler calling the probed function
    again gets no second handler run, only nmissed."""
    async with Machine(cpus=1) as m:
        calls = []

        def pre(p, r):
            calls.append(1)
            r.cpu.call("kprobe_target", 3)
        kp = await _optimized(m, pre_handler=pre)
        assert await m.call("kprobe_target", 30) == 10
        assert calls == [1] and kp.nmissed == 1


async def test_handler_exception_goes_to_the_fault_handler():
    """A pre_handler raising on an optimized probe counts nmissed and asks the
    fault_handler; handled, the call goes on."""
    async with Machine(cpus=1) as m:
        seen = []

        def pre(p, r):
            raise RuntimeError("boom")
        kp = await _optimized(m, pre_handler=pre,
                              fault_handler=lambda p, r, t: seen.append(t) or 1)
        assert await m.call("kprobe_target", 30) == 10
        assert seen == [-1] and kp.nmissed == 1


@pytest.mark.parametrize("arch", ["arm64", "sparc64"])
async def test_trap_based_arches_never_optimize(arch):
    """arm64 and sparc64 keep their breakpoints."""
    async with Machine(arch=arch, cpus=1) as m:
        kp = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: 0)
        await m.kprobes.register_kprobe(kp)
        s = m.kprobes.statistics()
        assert (s.optimized, s.unoptimized, s.optimizing) == (0, 0, 0)
        assert m.kprobes.optimizer.why_not(m.kprobes.sites()[kp.addr]) == \
            "this architecture has no optprobes"


@pytest.mark.parametrize("arch", ["x86_64", "i386", "arm", "ppc"])
async def test_transparency_on_every_instruction_optimized(arch):
    """A probe on each instruction boundary of the conformance functions, optimized wherever
    the checks allow (the optimizer done before the calls), leaves every result unchanged;
    the text is whole again afterwards."""
    from test_conformance import TRANSPARENCY
    async with Machine(arch=arch, cpus=2, seed=2) as m:
        expected = {f: [await m.call(f, *a) for a in args] for f, args in TRANSPARENCY.items()}
        optimized = 0
        opt = m.kprobes.optimizer
        for func, args in TRANSPARENCY.items():
            sym = m.kallsyms.lookup(func)
            for addr in sorted(m.kprobes._insn_boundaries(sym)):
                hits = []
                kp = Kprobe(addr=addr, pre_handler=lambda p, r: hits.append(1))
                try:
                    await m.kprobes.register_kprobe(kp)
                except KprobeError:
                    continue
                await opt.wait_for_kprobe_optimizer()
                optimized += opt.is_optimized(addr)
                got = [await m.call(func, *a) for a in args]
                await m.kprobes.unregister_kprobe(kp)
                assert got == expected[func], (func, m.format_addr(addr))
            assert m.read_memory(sym.addr, sym.size) == m.kprobes.original_text(sym.addr,
                                                                                 sym.size)
        await opt.wait_for_kprobe_optimizer()
        assert optimized > 30 and m.oopses == [] and opt.ops == {}


# On x86 the jump (jmp rel32) is longer than the breakpoint: its operand, and the region's
# own bytes put back under it, are written after the int3 and may equal it.  On arm and ppc
# the jump is one whole instruction written over the probe's own breakpoint.
@pytest.mark.parametrize("arch", ["x86_64", "i386"])
async def test_a_jump_operand_equal_to_the_breakpoint_is_no_orphan(arch):
    """A probe whose jump to its stub has the breakpoint byte as the operand's first byte:
    optimizing and unregistering it is clean (no "orphans" report; the invariant once took
    that byte for a breakpoint), and the text is whole again."""
    async with Machine(arch=arch, cpus=2, seed=1, invariants="record") as m:
        opt, bp = m.kprobes.optimizer, m.backend.breakpoint
        # The stub the next probe gets: the one a first probe took and gave back.
        first = Kprobe(symbol_name="kprobe_target")
        await m.kprobes.register_kprobe(first)
        await opt.wait_for_kprobe_optimizer()
        stub = opt.ops[first.addr].stub
        await m.kprobes.unregister_kprobe(first)
        await opt.wait_for_kprobe_optimizer()
        sites = [a for sym in m.kallsyms.functions() if sym.module is None
                 for a in sorted(m.kprobes._insn_boundaries(sym))
                 if opt.facts.encode_jump(a, stub)[len(bp):2 * len(bp)] == bp
                 and not isinstance(opt.region(a), str)]
        addr = sites[0]
        kp = Kprobe(addr=addr, pre_handler=lambda p, r: 0)
        await m.kprobes.register_kprobe(kp)
        await opt.wait_for_kprobe_optimizer()
        assert opt.is_optimized(addr) and opt.ops[addr].stub == stub
        assert m.read_memory(addr + len(bp), len(bp)) == bp
        await m.kprobes.unregister_kprobe(kp)
        await opt.wait_for_kprobe_optimizer()
        assert await m.call("kprobe_target", 30) == 10
        sym = m.kallsyms.containing(addr)
        assert m.read_memory(sym.addr, sym.size) == m.kprobes.original_text(sym.addr, sym.size)
        assert m.invariants.violations == []


@pytest.mark.parametrize("arch", ["x86_64", "i386"])
async def test_instruction_bytes_equal_to_the_breakpoint_put_back_are_no_orphan(arch):
    """An optimized probe on `mov eax, imm32` whose immediate is the breakpoint byte: when
    it is unregistered, the jump's operand is replaced by the instruction's own bytes, which
    start with that byte; that is the text, not an orphan breakpoint."""
    async with Machine(arch=arch, cpus=2, seed=1, invariants="record") as m:
        opt, bp = m.kprobes.optimizer, m.backend.breakpoint
        sym = m.kallsyms.lookup("kprobe_target")
        addr = sym.addr + m.read_memory(sym.addr, sym.size).index(b"\xb8\xab\xaa\xaa\xaa")
        m.write_memory(addr + 1, bp * 4)               # mov eax, 0xcccccccc
        kp = Kprobe(addr=addr, pre_handler=lambda p, r: 0)
        await m.kprobes.register_kprobe(kp)
        await opt.wait_for_kprobe_optimizer()
        assert opt.is_optimized(addr) and opt.ops[addr].region_end == addr + 5
        await m.kprobes.unregister_kprobe(kp)
        await opt.wait_for_kprobe_optimizer()
        assert m.read_memory(addr, 5) == b"\xb8" + bp * 4
        assert await m.call("kprobe_target2", 30) == 11
        assert m.invariants.violations == []


async def test_exact_accounting_under_smp_optimized():
    """4 CPUs hammering an optimized probe: every call is exactly one hit, and the results
    equal the unprobed run."""
    async def run(probe: bool):
        async with Machine(cpus=4, seed=5) as m:
            hits = []
            kp = Kprobe(symbol_name="do_fork", pre_handler=lambda p, r: hits.append(r.cpu.id))
            if probe:
                await m.kprobes.register_kprobe(kp)
                await m.kprobes.optimizer.wait_for_kprobe_optimizer()
                assert m.kprobes.optimizer.is_optimized(kp.addr)
            out = {}

            async def loop(c):
                out[c] = await m.call("fork_loop", 400, cpu=c)
            async with trio.open_nursery() as n:
                for c in range(4):
                    n.start_soon(loop, c)
            return hits, kp.nmissed, out
    hits, missed, out = await run(True)
    _, _, out0 = await run(False)
    assert len(hits) == 1600 and missed == 0 and out == out0
    assert sorted(set(hits)) == [0, 1, 2, 3]


async def test_trace_export_shows_the_optimizer(tmp_path):
    """The ftrace text names the optimized hit and the optimizer's steps; the Perfetto
    trace has the optimizer's waits as spans and the hit as a kprobe slice."""
    import json

    from smpkprobes.tools import _trace_export
    async with Machine(cpus=2, seed=1) as m:
        kp = await _optimized(m, pre_handler=lambda p, r: 0)
        await m.call("kprobe_target", 3)
        await m.kprobes.unregister_kprobe(kp)
        await m.kprobes.optimizer.wait_for_kprobe_optimizer()
    names = [line.split(": ")[1].rstrip(":") for line in _trace_export.ftrace_text(m).splitlines()
             if not line.startswith("#") and ("opt" in line or "unoptimize" in line)]
    assert names == ["optimize_kprobe", "optimizer_wait_start", "optimizer_wait_end",
                     "optprobe_jump_written", "kprobe_optimized_hit", "unoptimize_kprobe",
                     "optimizer_wait_start", "optimizer_wait_end"]
    _trace_export.export_perfetto(m, tmp_path / "t.json")
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    spans = [e["name"] for e in events if e.get("cat") == "optimizer" and e["ph"] == "b"]
    assert spans == ["optimizer grace period #1", "optimizer grace period #2"]
    assert any(e.get("name") == "kprobe kprobe_target+0x4 (optimized)" for e in events)


@pytest.mark.parametrize("arch", ["x86_64", "arm"])
async def test_a_module_unload_frees_its_optimized_probes_detours(arch):
    """kill_optimized_kprobe: unloading a module under an optimized probe makes the probe
    GONE and hands its detour buffer back after a grace period; the same probe can then be
    unregistered, and every detour buffer is free again (none leaked), with the invariant
    checker silent throughout."""
    async with Machine(arch=arch, cpus=2, seed=3, invariants="record") as m:
        opt = m.kprobes.optimizer
        mod = await m.load_module("example_mod")
        kp = Kprobe(symbol_name="example_mod_func", pre_handler=lambda p, r: 0)
        await m.kprobes.register_kprobe(kp)
        await opt.wait_for_kprobe_optimizer()
        assert m.kprobes.statistics().optimized == 1 and opt.is_optimized(kp.addr)
        assert opt._next_index - len(opt._free_index) == 1
        await m.unload_module(mod)
        assert not opt.is_optimized(kp.addr)
        await m.kprobes.unregister_kprobe(kp)
        await opt.wait_for_kprobe_optimizer()
        assert opt._next_index - len(opt._free_index) == 0 and not opt._by_stub
        assert m.invariants.violations == []


@pytest.mark.parametrize("arch", ["x86_64", "arm"])
async def test_a_gone_optimized_probe_revived_by_its_module_reloaded_hits_again(arch):
    """The module under an optimized probe is unloaded (the probe is GONE, its detour
    killed) and loaded again at the same place: a new probe there revives the aggregate
    with fresh text, so it traps or is optimized anew; it never goes through the killed
    detour.  Its handler runs once per call, the GONE probe's never does again."""
    async with Machine(arch=arch, cpus=2, seed=3, invariants="record") as m:
        opt = m.kprobes.optimizer
        mod = await m.load_module("example_mod")
        old = []
        kp = Kprobe(symbol_name="example_mod_func", pre_handler=lambda p, r: old.append(1))
        await m.kprobes.register_kprobe(kp)
        await opt.wait_for_kprobe_optimizer()
        assert opt.is_optimized(kp.addr)
        await m.call("example_mod_func", 1)
        await m.unload_module(mod)
        await opt.wait_for_kprobe_optimizer()
        mod = await m.load_module("example_mod")
        assert m.kallsyms_lookup_name("example_mod_func") == kp.addr   # the same place
        new = []
        kp2 = Kprobe(symbol_name="example_mod_func", pre_handler=lambda p, r: new.append(1))
        await m.kprobes.register_kprobe(kp2)
        for _ in range(2):
            await m.call("example_mod_func", 1)
        await opt.wait_for_kprobe_optimizer()
        for _ in range(2):
            await m.call("example_mod_func", 1)
        assert (len(old), len(new)) == (1, 4) and kp.gone and not kp2.gone
        await m.kprobes.unregister_kprobes([kp, kp2])
        await m.unload_module(mod)
        assert m.invariants.violations == []


class _HeldOptimizer(Optimizer):
    """A broken optimizer: it believes a task is always inside its regions (RCU tasks)."""

    def _holdout(self, ranges):
        return True


class _HeldCore(KprobesSubsystem):
    def _make_optimizer(self, kernel):
        return _HeldOptimizer(self, kernel)


async def test_a_stalled_optimizer_is_reported_not_waited_for_for_ever():
    """wait_for_kprobe_optimizer waits as long as something may hold the optimizer back;
    when its batch stands still with every CPU quiescent and no task in a region (here a
    broken RCU-tasks check), it raises SimulationError naming the phase, records it and
    prints it, and the machine runs on.  A healthy optimizer under load is not reported
    (the rest of this file)."""
    async with Machine(cpus=2, seed=1, probe_core=_HeldCore, invariants="record") as m:
        kp = Kprobe(symbol_name="kprobe_target", offset=4, pre_handler=lambda p, r: 0)
        await m.kprobes.register_kprobe(kp)
        with trio.fail_after(60):
            with pytest.raises(SimulationError, match=r"kprobe optimizer stalled: its batch "
                                                      r"of 1 probe\(s\) stayed in phase 'gp'"):
                await m.kprobes.optimizer.wait_for_kprobe_optimizer()
        assert any("kprobe optimizer stalled" in e for e in m.kprobes.simulation_errors)
        assert any("kprobe optimizer stalled" in line for line in m.printk_log)
        assert not m.kprobes.optimizer.is_optimized(kp.addr)
        assert await m.call("kprobe_target", 30) == 10       # a plain kprobe meanwhile
        assert await m.call("fib", 10, cpu=1) == 55

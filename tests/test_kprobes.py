"""The kprobes core on x86_64: handlers, single-step, aggregates, batches, errors, debugfs."""

import errno

import capstone
import pytest
import trio

from smpkprobes import Kprobe, KprobeError, Machine, Oops
from _probes import register_where_possible
from smpkprobes.kprobes._core import Status


@pytest.fixture(params=["optimized", "trap-based"])
async def m(request):
    """Every test here runs twice: with jump optimization on (the default) and off."""
    async with Machine(cpus=4, seed=1) as machine:
        if request.param == "trap-based":
            await machine.sysctl.write("debug/kprobes-optimization", "0")
        yield machine


# -- lib/test_kprobes.c ports ---------------------------------------------------------
async def test_kprobe(m):
    """test_kprobe: pre and post handlers run once each and see the argument."""
    seen = []
    kp = Kprobe(symbol_name="kprobe_target",
                pre_handler=lambda p, regs: seen.append(("pre", regs.arg(0), regs.ip)),
                post_handler=lambda p, regs, flags: seen.append(("post", flags)))
    await m.kprobes.register_kprobe(kp)
    assert await m.call("kprobe_target", 0x1234) == 0x1234 // 3
    await m.kprobes.unregister_kprobe(kp)
    assert seen == [("pre", 0x1234, kp.addr), ("post", 0)]


async def test_kprobes_batch_of_two(m):
    """test_kprobes: a batch of two probes on two targets both fire."""
    hits = []
    kps = [Kprobe(symbol_name=s, pre_handler=lambda p, r: hits.append(p.symbol_name),
                  post_handler=lambda p, r, f: hits.append(p.symbol_name + ".post"))
           for s in ("kprobe_target", "kprobe_target2")]
    await m.kprobes.register_kprobes(kps)
    assert await m.call("kprobe_target", 30) == 10
    assert await m.call("kprobe_target2", 30) == 11
    await m.kprobes.unregister_kprobes(kps)
    assert hits == ["kprobe_target", "kprobe_target.post", "kprobe_target2",
                    "kprobe_target2.post"]
    assert all(p.addr is not None and not p.registered for p in kps)


async def test_kprobe_missed(m):
    """test_kprobe_missed: handlers calling the probed function give nmissed == 2."""
    kp = Kprobe(symbol_name="kprobe_recursed_target",
                pre_handler=lambda p, regs: regs.cpu.call("kprobe_recursed_target") and 0,
                post_handler=lambda p, regs, f: regs.cpu.call("kprobe_recursed_target"))
    await m.kprobes.register_kprobe(kp)
    r = await m.call("kprobe_recursed_target")
    await m.kprobes.unregister_kprobe(kp)
    assert r == 0x5a5a and kp.nmissed == 2
    assert m.kprobes.hits == 1 and m.kprobes.missed == 2


# -- SMP accounting ---------------------------------------------------------------------
async def test_exact_accounting_under_smp():
    """4 CPUs hammering a probe: every call is a hit or a miss, the CPUs interleave, and the
    results equal the unprobed run.  (Trap-based: an optimized probe's hits take no trap and
    so end fewer quanta; tests/test_optprobes.py has its own.)"""
    async def run(probe: bool):
        async with Machine(cpus=4, seed=5) as m:
            await m.sysctl.write("debug/kprobes-optimization", "0")
            hits = []
            kp = Kprobe(symbol_name="do_fork", pre_handler=lambda p, r: hits.append(r.cpu.id))
            if probe:
                await m.kprobes.register_kprobe(kp)
            out = {}

            async def loop(c):
                out[c] = await m.call("fork_loop", 400, cpu=c)
            async with trio.open_nursery() as n:
                for c in range(4):
                    n.start_soon(loop, c)
            last = await m.call("do_fork", 0, 0, 0, 0, 0, 0)
            return hits, kp.nmissed, out, last
    hits, missed, out, last = await run(True)
    _, _, out0, last0 = await run(False)
    # 4 x 400 calls from the loops, plus the final do_fork call while still probed.
    assert len(hits) + missed == 1601 and missed == 0
    assert (out, last) == (out0, last0)
    switches = sum(a != b for a, b in zip(hits, hits[1:]))
    assert switches > 20 and sorted(set(hits)) == [0, 1, 2, 3]


# -- transparency: tests/test_conformance.py::test_transparency_on_every_instruction ---------

# -- batch unregistration while firing -----------------------------------------------------
async def _fire_and_unregister(batch: bool, seed: int, trap_delay: float):
    async with Machine(cpus=4, seed=seed, trap_delay=trap_delay) as m:
        spots = []
        for name in ("do_fork", "bench_target"):
            spots += sorted(m.kprobes._insn_boundaries(m.kallsyms.lookup(name)))
        original = {a: m.read_memory(a, 1) for a in spots}
        unregistered = [False]
        late = []

        def pre(p, regs):
            if unregistered[0]:
                late.append(p.addr)
        probes = await register_where_possible(m, spots, pre_handler=pre)
        results = {}

        async def worker(c):
            results[c] = (await m.call("fork_loop", 300, cpu=c), await m.call("bench_loop", 300, cpu=c))
        gp0 = None
        async with trio.open_nursery() as n:
            for c in (1, 2, 3):
                n.start_soon(worker, c)
            await m.call("msleep", 0, cpu=0)
            await m.call("fib", 10, cpu=0)
            gp0 = m.statistics().grace_periods
            if batch:
                await m.kprobes.unregister_kprobes(probes)
            else:
                for kp in probes:
                    await m.kprobes.unregister_kprobe(kp)
            gps = m.statistics().grace_periods - gp0
            unregistered[0] = True
        assert late == []
        assert all(m.read_memory(a, 1) == b for a, b in original.items())
        assert m.oopses == []
        assert results == {c: (300, 90000) for c in (1, 2, 3)}
        return gps, len(probes), m.statistics().stray_traps


async def test_batch_unregister_takes_one_grace_period():
    """Unregistering N firing probes as a batch costs one grace period; one by one, N."""
    gps, n, _ = await _fire_and_unregister(True, seed=3, trap_delay=1 / 16)
    assert gps == 1 and n > 10
    gps, n, _ = await _fire_and_unregister(False, seed=3, trap_delay=1 / 16)
    assert gps == n


async def test_removal_race_is_handled(stress_seeds):
    """A CPU that trapped just before the disarm backs up and re-executes (a stray trap)."""
    strays = 0
    for seed in range(stress_seeds):
        _, _, s = await _fire_and_unregister(True, seed=seed, trap_delay=1.0)
        strays += s
    assert strays > 0


# -- aggregates ----------------------------------------------------------------------------
async def test_aggregate_order_shortcircuit_post_and_removal(m):
    """Children's pre_handlers run newest first, a non-zero return stops the rest, every
    post_handler runs, a miss counts on every child, and removing a child keeps the rest."""
    log = []
    a = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: log.append("a"),
               post_handler=lambda p, r, f: log.append("a.post"))
    b = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: log.append("b"),
               post_handler=lambda p, r, f: log.append("b.post"))
    await m.kprobes.register_kprobe(a)
    await m.kprobes.register_kprobe(b)
    assert await m.call("kprobe_target", 9) == 3
    assert log == ["b", "a", "a.post", "b.post"] or log == ["b", "a", "b.post", "a.post"]
    log.clear()
    c = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: log.append("c") or 0)
    await m.kprobes.register_kprobe(c)
    r = Kprobe(symbol_name="kprobe_recursed_target",
               pre_handler=lambda p, regs: regs.cpu.call("kprobe_target", 3) and 0)
    await m.kprobes.register_kprobe(r)
    await m.call("kprobe_recursed_target")
    assert (a.nmissed, b.nmissed, c.nmissed) == (1, 1, 1)
    await m.kprobes.unregister_kprobe(b)
    log.clear()
    assert await m.call("kprobe_target", 9) == 3
    assert log == ["c", "a", "a.post"]
    await m.kprobes.unregister_kprobes([a, c, r])
    assert m.read_memory(a.addr, 1) != b"\xcc"


async def test_pre_handler_nonzero_skips_the_instruction(m):
    """A pre_handler that sets regs.ip and returns 1 overrides the function (error injection)."""
    ret = m.kallsyms_lookup_name("kprobe_target")

    def inject(p, regs):
        regs.rax = (-12) & (2**64 - 1)
        regs.rip = regs.read_word(regs.sp)
        regs.rsp = regs.sp + 8
        return 1
    # A probe that redirects must not be jump-optimized: an empty post_handler suppresses
    # optimization (Documentation/trace/kprobes.rst); tests/test_optprobes.py shows regs.ip
    # ignored on an optimized one.
    kp = Kprobe(addr=ret, pre_handler=inject, post_handler=lambda p, r, f: None)
    await m.kprobes.register_kprobe(kp)
    assert await m.call("kprobe_target", 9) == -12
    await m.kprobes.unregister_kprobe(kp)
    assert await m.call("kprobe_target", 9) == 3


# -- faults and bad handlers ------------------------------------------------------------------
async def test_handler_exception_becomes_an_oops_of_that_task_only(m):
    """An exception in a handler counts a miss and, unhandled, oopses only that task."""
    kp = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: 1 / 0)
    await m.kprobes.register_kprobe(kp)
    with pytest.raises(Oops, match="ZeroDivisionError") as info:
        await m.call("kprobe_target", 9, cpu=1)
    assert kp.nmissed == 1 and "kprobe_target" in info.value.record.cause
    assert m.kprobes.kprobe_ctlblk[1].current_kprobe is None and m.cpus[1].preempt_count == 0
    await m.kprobes.unregister_kprobe(kp)
    assert await m.call("kprobe_target", 9, cpu=1) == 3


async def test_fault_handler_can_handle_a_handler_exception(m):
    """A fault_handler returning 1 handles the exception: the call completes normally."""
    seen = []
    kp = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: 1 / 0,
                fault_handler=lambda p, r, trapnr: seen.append(trapnr) or 1)
    await m.kprobes.register_kprobe(kp)
    assert await m.call("kprobe_target", 9) == 3
    await m.kprobes.unregister_kprobe(kp)
    assert seen == [-1] and kp.nmissed == 1 and m.oopses == []


async def test_unrecoverable_reentry_is_reported(m):
    """A reentry while already in REENTER is reported as "Unrecoverable kprobe detected".
    (The trap path's rule: an optimized probe hit during a handler only counts nmissed.)"""
    await m.sysctl.write("debug/kprobes-optimization", "0")
    def corrupt(p, regs):
        # as if the kprobe machinery were probed
        m.kprobes.kprobe_ctlblk[regs.cpu.id].kprobe_status = Status.REENTER
        regs.cpu.call("kprobe_target", 3)
    kp = Kprobe(symbol_name="kprobe_recursed_target", pre_handler=corrupt)
    t = Kprobe(symbol_name="kprobe_target")
    await m.kprobes.register_kprobes([kp, t])
    with pytest.raises(Oops, match="Unrecoverable kprobe detected at kprobe_target"):
        await m.call("kprobe_recursed_target")
    assert any("Unrecoverable kprobe detected" in s for s in m.printk_log)
    await m.kprobes.unregister_kprobes([kp, t])
    assert await m.call("kprobe_recursed_target") == 0x5a5a


# -- registration errors ------------------------------------------------------------------------
@pytest.mark.parametrize("make,err", [
    (lambda m: Kprobe(symbol_name="do_fork", addr=0x100000), errno.EINVAL),
    (lambda m: Kprobe(), errno.EINVAL),
    (lambda m: Kprobe(symbol_name="no_such_function"), errno.ENOENT),
    (lambda m: Kprobe(addr=0x1000), errno.EINVAL),
    (lambda m: Kprobe(symbol_name="jprobe_return"), errno.EINVAL),
    (lambda m: Kprobe(symbol_name="kretprobe_trampoline"), errno.EINVAL),
    (lambda m: Kprobe(symbol_name="do_page_fault"), errno.EINVAL),
    (lambda m: Kprobe(symbol_name="notifier_call_chain", offset=1), errno.EINVAL),
    (lambda m: Kprobe(symbol_name="do_fork", offset=2), errno.EILSEQ),
    (lambda m: Kprobe(addr=m.kallsyms_lookup_name("bad_insn") + 4), None),
])
async def test_bad_probe_definitions(m, make, err):
    """Each bad definition raises KprobeError with the documented errno, changing nothing."""
    kp = make(m)
    text = m.read_memory(0x100000, 0x2000)
    if err is None:
        # the ud2 in bad_insn: find its boundary and expect EOPNOTSUPP
        sym = m.kallsyms.lookup("bad_insn")
        ud2 = next(a for a in sorted(m.kprobes._insn_boundaries(sym))
                   if m.read_memory(a, 2) == b"\x0f\x0b")
        kp, err = Kprobe(addr=ud2), errno.EOPNOTSUPP
    with pytest.raises(KprobeError) as info:
        await m.kprobes.register_kprobe(kp)
    assert info.value.errno == err
    assert m.read_memory(0x100000, 0x2000) == text
    assert m.kprobes.statistics().sites == 0 and m.kprobes.slots.statistics()["used"] == 0


async def test_double_registration_is_einval(m):
    """Registering the same probe object twice is EINVAL; after unregister it may register
    again with addr reset."""
    kp = Kprobe(symbol_name="kprobe_target")
    await m.kprobes.register_kprobe(kp)
    kp2 = Kprobe(addr=kp.addr)
    await m.kprobes.register_kprobe(kp2)
    with pytest.raises(KprobeError, match="already registered"):
        kp2.symbol_name = None
        await m.kprobes.register_kprobe(kp2)
    await m.kprobes.unregister_kprobes([kp, kp2])
    kp.addr, kp.flags = None, 0
    await m.kprobes.register_kprobe(kp)
    await m.kprobes.unregister_kprobe(kp)


async def test_batch_register_rolls_back(m):
    """A failing batch unregisters what it registered and reports the failing index."""
    good = [Kprobe(symbol_name="kprobe_target"), Kprobe(symbol_name="kprobe_target2")]
    bad = Kprobe(symbol_name="no_such_function")
    text = m.read_memory(0x100000, 0x2000)
    with pytest.raises(KprobeError) as info:
        await m.kprobes.register_kprobes([*good, bad])
    assert info.value.errno == errno.ENOENT and info.value.index == 2
    assert not any(p.registered for p in good)
    assert m.read_memory(0x100000, 0x2000) == text
    with pytest.raises(KprobeError, match="empty"):
        await m.kprobes.register_kprobes([])


async def test_unregister_incorrect_probe_sets_addr_none(m):
    """Unregistering a never-registered probe sets its addr to None; the rest still go."""
    ok = Kprobe(symbol_name="kprobe_target")
    await m.kprobes.register_kprobe(ok)
    stray = Kprobe(addr=0x100010)
    await m.kprobes.unregister_kprobes([stray, ok])
    assert stray.addr is None and not ok.registered


async def test_enable_disable_and_global_switch(m):
    """disable/enable toggle one probe; kprobes/enabled disarms all and keeps per-probe
    state; probes registered while disarmed stay disarmed."""
    hits = []
    kp = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: hits.append(1))
    await m.kprobes.register_kprobe(kp)
    await m.kprobes.disable_kprobe(kp)
    await m.call("kprobe_target", 1)
    assert hits == [] and kp.disabled and m.read_memory(kp.addr, 1) != b"\xcc"
    await m.kprobes.enable_kprobe(kp)
    await m.call("kprobe_target", 1)
    assert hits == [1]
    await m.debugfs.write("kprobes/enabled", "0")
    assert m.debugfs.read("kprobes/enabled") == "0\n"
    k2 = Kprobe(symbol_name="kprobe_target2", pre_handler=lambda p, r: hits.append(2))
    await m.kprobes.register_kprobe(k2)
    await m.call("kprobe_target", 1)
    await m.call("kprobe_target2", 1)
    assert hits == [1] and m.read_memory(k2.addr, 1) != b"\xcc"
    await m.debugfs.write("kprobes/enabled", "Y")
    await m.call("kprobe_target2", 1)
    assert hits == [1, 2]
    with pytest.raises(KprobeError) as info:
        await m.debugfs.write("kprobes/enabled", "2")
    assert info.value.errno == errno.EINVAL
    await m.kprobes.unregister_kprobes([kp, k2])


async def test_debugfs_list_and_blacklist(m):
    """kprobes/list shows one line per probe, sorted, with type, symbol+off and flags."""
    k = Kprobe(symbol_name="kprobe_target2")
    k2 = Kprobe(symbol_name="kprobe_target", offset=0)
    await m.kprobes.register_kprobes([k, k2])
    await m.kprobes.disable_kprobe(k)
    a1, a2 = m.kallsyms_lookup_name("kprobe_target"), m.kallsyms_lookup_name("kprobe_target2")
    lines = sorted([(a1, f"{a1:016x}  k  kprobe_target+0x0\n"),
                    (a2, f"{a2:016x}  k  kprobe_target2+0x0 [DISABLED]\n")])
    assert m.debugfs.read("kprobes/list") == "".join(line for _, line in lines)
    bl = m.debugfs.read("kprobes/blacklist")
    dpf = m.kallsyms.lookup("do_page_fault")
    assert f"0x{dpf.addr:016x}-0x{dpf.addr + dpf.size:016x}\tdo_page_fault\n" in bl
    assert "\tjprobe_return\n" in bl and "\tkretprobe_trampoline\n" in bl


async def test_module_probes_go_gone(m):
    """Probes in a module become [GONE] at unload, stay listed, can be unregistered, and
    cannot be enabled; probes in freed init text are ENOENT."""
    mod = await m.load_module("example_mod")
    kp = Kprobe(symbol_name="example_mod_func")
    await m.kprobes.register_kprobe(kp)
    assert await m.call("example_mod_func", 1) == 2
    with pytest.raises(KprobeError) as info:
        await m.kprobes.register_kprobe(Kprobe(addr=mod.init_text[0]))
    assert info.value.errno == errno.ENOENT
    await m.unload_module(mod)
    assert kp.gone and m.debugfs.read("kprobes/list").rstrip().endswith("[example_mod] [GONE]")
    with pytest.raises(KprobeError) as info:
        await m.kprobes.enable_kprobe(kp)
    assert info.value.errno == errno.EINVAL
    await m.kprobes.unregister_kprobe(kp)
    assert m.debugfs.read("kprobes/list") == ""


async def test_stack_trace_in_a_handler(m):
    """regs.stack_trace() starts at ip and walks to the callers."""
    traces = []
    kp = Kprobe(symbol_name="stacktrace_internal_target",
                pre_handler=lambda p, regs: traces.append(regs.stack_trace()))
    await m.kprobes.register_kprobe(kp)
    await m.call("stacktrace_driver")
    await m.kprobes.unregister_kprobe(kp)
    names = [m.symbolize(a)[0] for a in traces[0]]
    assert names == ["stacktrace_internal_target", "stacktrace_target", "stacktrace_driver",
                     "__hc_task_return"]


# -- a pre_handler's register writes reach the guest, on every path -------------------------
@pytest.mark.parametrize("path", ["optimized", "boosted", "stepped"])
@pytest.mark.parametrize("arch", __import__("smpkprobes.cpus", fromlist=["x"]).available())
async def test_a_pre_handler_argument_write_reaches_the_function(arch, path):
    """regs.set_arg(0, ...) at the function's entry changes what the function computes,
    whichever way the probed instruction then runs: from the detour buffer (optimized),
    boosted out of line, or stepped with a post_handler (the write is flushed to the CPU
    before it leaves the trap, except the PC).  Each run's result is the unprobed call's
    with the new argument."""
    async with Machine(arch=arch, cpus=2, seed=3) as m:
        if path != "optimized":
            await m.sysctl.write("debug/kprobes-optimization", "0")
        want = await m.call("kprobe_target", 300)
        seen = []

        def pre(p, regs):
            seen.append(regs.arg(0))
            regs.set_arg(0, 300)
        kp = Kprobe(symbol_name="kprobe_target", pre_handler=pre,
                    post_handler=(lambda p, r, f: None) if path == "stepped" else None)
        await m.kprobes.register_kprobe(kp)
        await m.kprobes.optimizer.wait_for_kprobe_optimizer()
        got = [await m.call("kprobe_target", v, cpu=v % 2) for v in (9, 12, 15)]
        await m.kprobes.unregister_kprobe(kp)
        assert (got, seen) == ([want] * 3, [9, 12, 15])
        assert await m.call("kprobe_target", 9) == 3


async def test_a_boosted_slot_waits_a_further_grace_period_before_reuse():
    """free_insn_slot: the slot of a probe that was never boosted is free again once the
    unregistration's grace period is over; a boosted (dirty) slot, which a CPU may still be
    leaving by its own jump back, is garbage until collect_garbage_slots has waited one
    more grace period."""
    async with Machine(cpus=2, seed=1) as m:
        await m.sysctl.write("debug/kprobes-optimization", "0")
        slots = m.kprobes.slots
        free0 = slots.statistics()["free"]
        stepped = Kprobe(symbol_name="kprobe_target", post_handler=lambda p, r, f: None)
        boosted = Kprobe(symbol_name="kprobe_target2", pre_handler=lambda p, r: 0)
        await m.kprobes.register_kprobes([stepped, boosted])
        assert (await m.call("kprobe_target", 9), await m.call("kprobe_target2", 9)) == (3, 4)
        assert slots.statistics() == {"used": 2, "garbage": 0, "free": free0 - 2}
        await m.kprobes.unregister_kprobe(stepped)
        assert slots.statistics() == {"used": 1, "garbage": 0, "free": free0 - 1}
        await m.kprobes.unregister_kprobe(boosted)
        assert slots.statistics() == {"used": 0, "garbage": 1, "free": free0 - 1}
        await slots.collect_garbage_slots()
        assert slots.statistics() == {"used": 0, "garbage": 0, "free": free0}


@pytest.mark.parametrize("post", [True, False], ids=["stepped", "boosted"])
async def test_the_control_block_walks_the_kernels_states_for_one_hit(post):
    """kprobe_ctlblk's recorded transitions for one trap-based hit: HIT_ACTIVE, then for a
    stepped probe HIT_SS and (with a post_handler) HIT_SSDONE, then reset_current_kprobe
    (NONE, no current probe); a boosted probe goes from HIT_ACTIVE straight to NONE."""
    async with Machine(cpus=1, seed=1) as m:
        await m.sysctl.write("debug/kprobes-optimization", "0")
        kp = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: 0,
                    post_handler=(lambda p, r, f: None) if post else None)
        await m.kprobes.register_kprobe(kp)
        kcb = m.kprobes.kprobe_ctlblk[0]
        assert kcb.transitions is None          # not recording until asked
        kcb.transitions = []
        assert await m.call("kprobe_target", 9, cpu=0) == 3
        log, kcb.transitions = kcb.transitions, None
        await m.kprobes.unregister_kprobe(kp)
        a = kp.addr
        assert log == ([(a, "HIT_ACTIVE"), (a, "HIT_SS"), (a, "HIT_SSDONE"), (0, "NONE")]
                       if post else [(a, "HIT_ACTIVE"), (0, "NONE")])


async def test_a_reentered_probe_on_a_simulated_call_still_makes_the_call(m):
    """A probe on a `call` (simulated: it cannot run out of line) hit from inside another
    probe's handler is reentered (missed, as kprobe_reenter says), and the simulated call's
    register and stack changes are written back before the CPU goes on: the nested guest
    call returns the right value, as does a direct call afterwards, which the probe sees."""
    caller = m.kallsyms_lookup_name("jprobe_stackargs_caller")
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    call = next(i.address for i in md.disasm(m.read_memory(caller, 128), caller)
                if i.mnemonic == "call")
    seen, nested = [], []
    q = Kprobe(addr=call, pre_handler=lambda p, r: seen.append("q") and 0)
    p = Kprobe(symbol_name="kprobe_target",
               pre_handler=lambda p, r: nested.append(
                   r.cpu.call("jprobe_stackargs_caller", 1)) and 0)
    await m.kprobes.register_kprobes([q, p])
    assert await m.call("kprobe_target", 9) == 3
    assert (nested, seen, q.nmissed) == ([385], [], 1)
    assert await m.call("jprobe_stackargs_caller", 2) == 385 + 55
    assert (seen, q.nmissed) == (["q"], 1)
    await m.kprobes.unregister_kprobes([q, p])


async def test_disabling_the_post_handler_child_lets_the_aggregate_boost_again():
    """Trap-based: an aggregate whose only post_handler child is disabled boosts its hits
    (no post processing is left to do), and steps them again once that child is enabled;
    the post_handler runs only while enabled."""
    async with Machine(cpus=1, seed=1) as m:
        await m.sysctl.write("debug/kprobes-optimization", "0")
        posts = []
        a = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: 0)
        b = Kprobe(symbol_name="kprobe_target", post_handler=lambda p, r, f: posts.append(1))

        async def steps():
            start = len(m.trace)
            assert await m.call("kprobe_target", 9) == 3
            return [e[0] if e[0] == "boost" else e[-1] for e in list(m.trace)[start:]
                    if e[0] in ("boost", "ss") and e[2] == a.addr]
        await m.kprobes.register_kprobes([a, b])
        assert (await steps(), posts) == (["slot"], [1])
        await m.kprobes.disable_kprobe(b)
        assert (await steps(), posts) == (["boost"], [1])
        await m.kprobes.enable_kprobe(b)
        assert (await steps(), posts) == (["slot"], [1, 1])
        await m.kprobes.unregister_kprobes([a, b])


async def test_out_of_instruction_slots_is_enomem_and_changes_nothing():
    """get_insn_slot finds no free slot (and no garbage to collect): the registration is
    ENOMEM, as the kernel's is, with nothing registered and the text untouched; once a
    slot is free again the same probe registers and works."""
    async with Machine(cpus=1, seed=1) as m:
        await m.sysctl.write("debug/kprobes-optimization", "0")
        slots = m.kprobes.slots
        held, slots._free = slots._free, []          # every slot handed out
        addr = m.kallsyms_lookup_name("kprobe_target")
        before = m.read_memory(addr, 8)
        kp = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: 0)
        with pytest.raises(KprobeError, match="out of instruction slots") as err:
            await m.kprobes.register_kprobe(kp)
        assert err.value.errno == errno.ENOMEM and not kp.registered
        assert m.kprobes.probes() == [] and m.read_memory(addr, 8) == before
        slots._free = held
        await m.kprobes.register_kprobe(kp)
        assert await m.call("kprobe_target", 9) == 3
        await m.kprobes.unregister_kprobe(kp)

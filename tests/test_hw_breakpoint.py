"""Hardware breakpoints (m.hw_breakpoints): the API's errnos, the per-arch semantics, and the
SMP behaviour, each triggered call checked against what the guest counted itself."""

import errno
import functools

import pytest
from hypothesis import example, given, settings, strategies as st
import trio

from smpkprobes import HwBreakpointAttr, KprobeError, Machine, Oops

DATA_ARCHES = ["x86_64", "i386", "arm64", "arm", "ppc"]


def word(m, name):
    w = m.backend.word_bytes
    return int.from_bytes(m.read_memory(m.kallsyms_lookup_name(name), w), m.backend.endian)


def watch(m, bp_type="w", **kw):
    return HwBreakpointAttr(symbol_name="watched_counter", bp_len=m.backend.word_bytes,
                            bp_type=bp_type, **kw)


async def fork_on_every_cpu(m, n):
    async with trio.open_nursery() as nursery:
        for c in range(m.ncpus):
            nursery.start_soon(functools.partial(m.call, "fork_loop", n, cpu=c))


# == errnos ==================================================================================
@pytest.mark.parametrize("attr, match", [
    (HwBreakpointAttr(symbol_name="watched_counter", bp_len=3), "bp_len 3 is not one of"),
    (HwBreakpointAttr(symbol_name="watched_counter", bp_len=16), "bp_len 16 is not one of"),
    (HwBreakpointAttr(symbol_name="watched_counter", bp_type="r"), "x86_64 has no 'r' breakpoints"),
    (HwBreakpointAttr(symbol_name="watched_counter", bp_type="wx"), "bp_type must be one of"),
    (HwBreakpointAttr(symbol_name="do_fork", bp_type="x", bp_len=1), "has bp_len 8, not 1"),
    (HwBreakpointAttr(), "exactly one of bp_addr and symbol_name"),
])
async def test_bad_attr_is_einval(attr, match):
    """A bad length or type, or no address, is EINVAL on x86_64 (hw_breakpoint_arch_parse)."""
    async with Machine(cpus=2) as m:
        with pytest.raises(KprobeError, match=match) as e:
            await m.hw_breakpoints.register_wide_hw_breakpoint(attr, lambda *a: None)
        assert e.value.errno == errno.EINVAL


async def test_misaligned_is_einval():
    """x86 wants the address aligned to the length; arm64 only one doubleword for the bytes."""
    async with Machine(cpus=1) as m:
        a = m.kallsyms_lookup_name("watched_counter")
        with pytest.raises(KprobeError, match="not aligned to bp_len 4") as e:
            await m.hw_breakpoints.register_wide_hw_breakpoint(
                HwBreakpointAttr(bp_addr=a + 2, bp_len=4), lambda *a: None)
        assert e.value.errno == errno.EINVAL
    async with Machine(arch="arm64", cpus=1) as m:
        a = m.kallsyms_lookup_name("watched_counter")
        await m.hw_breakpoints.register_wide_hw_breakpoint(
            HwBreakpointAttr(bp_addr=a + 2, bp_len=4), lambda *a: None)
        with pytest.raises(KprobeError, match="crosses an aligned 8-byte unit") as e:
            await m.hw_breakpoints.register_wide_hw_breakpoint(
                HwBreakpointAttr(bp_addr=a + 6, bp_len=4), lambda *a: None)
        assert e.value.errno == errno.EINVAL


async def test_fifth_breakpoint_on_x86_is_enospc():
    """x86 has four debug registers per CPU: the fifth wide breakpoint is ENOSPC, and freeing
    one makes room again."""
    async with Machine(cpus=4) as m:
        hw = m.hw_breakpoints
        a = m.kallsyms_lookup_name("watched_counter")
        handles = [await hw.register_wide_hw_breakpoint(
            HwBreakpointAttr(bp_addr=a + 8 * i), lambda *x: None) for i in range(4)]
        assert [len(m.hw_breakpoints.installed(c)) for c in range(4)] == [4, 4, 4, 4]
        with pytest.raises(KprobeError, match="no data breakpoint slot left on CPU 0") as e:
            await hw.register_wide_hw_breakpoint(HwBreakpointAttr(bp_addr=a + 32), lambda *x: None)
        assert e.value.errno == errno.ENOSPC
        await hw.unregister_wide_hw_breakpoint(handles[1])
        await hw.register_wide_hw_breakpoint(HwBreakpointAttr(bp_addr=a + 32), lambda *x: None)


async def test_task_breakpoints_count_against_every_cpu():
    """A per-task breakpoint needs a slot on every CPU: 3 wide + 1 task fill x86's four, so a
    second one for the task, or another wide one, is ENOSPC; another task still fits."""
    async with Machine(cpus=2) as m:
        hw = m.hw_breakpoints
        for _ in range(3):
            await hw.register_wide_hw_breakpoint(watch(m), lambda *x: None)
        t1, t2 = m.spawn("fork_loop", 1), m.spawn("fork_loop", 1)
        await hw.register_user_hw_breakpoint(watch(m), lambda *x: None, t1)
        for register in (lambda: hw.register_user_hw_breakpoint(watch(m), lambda *x: None, t1),
                         lambda: hw.register_wide_hw_breakpoint(watch(m), lambda *x: None)):
            with pytest.raises(KprobeError) as e:
                await register()
            assert e.value.errno == errno.ENOSPC
        await hw.register_user_hw_breakpoint(watch(m), lambda *x: None, t2)
        assert [await t.wait() for t in (t1, t2)] == [1, 1]


async def test_ppc_has_one_dabr_and_arm64_separate_pools():
    """ppc: one DABR, no instruction breakpoints.  arm64: 4 watchpoints and 6 breakpoints."""
    async with Machine(arch="ppc", cpus=1) as m:
        await m.hw_breakpoints.register_wide_hw_breakpoint(watch(m), lambda *x: None)
        with pytest.raises(KprobeError, match="ENOSPC"):
            await m.hw_breakpoints.register_wide_hw_breakpoint(watch(m, "r"), lambda *x: None)
        with pytest.raises(KprobeError, match="ppc has no 'x' breakpoints"):
            await m.hw_breakpoints.register_wide_hw_breakpoint(
                HwBreakpointAttr(symbol_name="do_fork", bp_type="x", bp_len=4), lambda *x: None)
    async with Machine(arch="arm64", cpus=1) as m:
        hw = m.hw_breakpoints
        for _ in range(4):
            await hw.register_wide_hw_breakpoint(watch(m), lambda *x: None)
        for _ in range(6):
            await hw.register_wide_hw_breakpoint(
                HwBreakpointAttr(symbol_name="do_fork", bp_type="x", bp_len=4), lambda *x: None)
        for attr in (watch(m), HwBreakpointAttr(symbol_name="do_fork", bp_type="x", bp_len=4)):
            with pytest.raises(KprobeError, match="ENOSPC"):
                await hw.register_wide_hw_breakpoint(attr, lambda *x: None)


async def test_sparc64_refuses_with_the_reason():
    """sparc64 has no hardware breakpoints in Linux: ENOSYS, saying why."""
    async with Machine(arch="sparc64", cpus=1) as m:
        with pytest.raises(KprobeError, match="no HAVE_HW_BREAKPOINT") as e:
            await m.hw_breakpoints.register_wide_hw_breakpoint(watch(m), lambda *x: None)
        assert e.value.errno == errno.ENOSYS


async def test_concurrent_registration_counts_slots_exactly():
    """Eight host tasks register wide breakpoints at once on x86: exactly four get slots, the
    others ENOSPC, and every CPU's registers hold exactly the four."""
    async with Machine(cpus=4, seed=5) as m:
        hw = m.hw_breakpoints
        ok, refused = [], []

        async def one(i):
            try:
                ok.append(await hw.register_wide_hw_breakpoint(watch(m), lambda *x: None))
            except KprobeError as e:
                refused.append(e.errno)
        async with trio.open_nursery() as n:
            n.start_soon(fork_on_every_cpu, m, 300)
            for i in range(8):
                n.start_soon(one, i)
        assert (len(ok), refused) == (4, [errno.ENOSPC] * 4)
        assert [len(hw.installed(c)) for c in range(4)] == [4, 4, 4, 4]
        async with trio.open_nursery() as n:
            for h in ok:
                n.start_soon(hw.unregister_wide_hw_breakpoint, h)
        assert [hw.constraints.in_use("data", c) for c in range(4)] == [0, 0, 0, 0]
        assert [hw.installed(c) for c in range(4)] == [[], [], [], []]


# == every trigger is one guest access ===========================================================
@pytest.mark.parametrize("preempt", [False, True])
@pytest.mark.parametrize("arch", DATA_ARCHES)
async def test_every_trigger_is_one_guest_write(arch, preempt):
    """A wide write breakpoint on watched_counter triggers once per do_fork call on each CPU:
    per CPU the calls that CPU made, in all last_pid's count (the guest's own counter)."""
    async with Machine(arch=arch, cpus=4, seed=7, preempt=preempt) as m:
        per_cpu = [0] * 4
        a = m.kallsyms_lookup_name("watched_counter")

        def triggered(bp, data, regs):
            assert data.addr == a and bp.cpu == data.cpu == regs.cpu.id
            per_cpu[data.cpu] += 1
        h = await m.hw_breakpoints.register_wide_hw_breakpoint(watch(m), triggered)
        before = word(m, "last_pid")
        await fork_on_every_cpu(m, 150)
        await m.hw_breakpoints.unregister_wide_hw_breakpoint(h)
        assert per_cpu == [150] * 4
        assert word(m, "last_pid") - before == h.hits == 600


@pytest.mark.parametrize("arch, seen, at", [("x86_64", [1, 2, 3], "do_fork+0xc"),
                                            ("i386", [1, 2, 3], "do_fork+0x1b"),
                                            ("ppc", [1, 2, 3], "do_fork+0x20"),
                                            ("arm64", [0, 1, 2], "do_fork+0x14"),
                                            ("arm", [0, 1, 2], "do_fork+0x18")])
async def test_trap_after_or_fault_before(arch, seen, at):
    """x86 and ppc call the handler after the store (new value, ip past the instruction);
    arm and arm64 before it (old value, ip at the store)."""
    async with Machine(arch=arch, cpus=1) as m:
        log = []
        await m.hw_breakpoints.register_wide_hw_breakpoint(
            watch(m), lambda bp, data, regs: log.append((word(m, "watched_counter"),
                                                         m.format_addr(regs.ip))))
        await m.call("fork_loop", 3)
        assert log == [(v, at) for v in seen]


@pytest.mark.parametrize("arch, bp_type, per_call", [
    ("x86_64", "rw", 1),       # `add [watched_counter], 1`: one read-modify-write instruction
    ("arm64", "rw", 2), ("arm64", "r", 1), ("arm", "r", 1), ("ppc", "rw", 2), ("ppc", "r", 1)])
async def test_read_breakpoints_trigger_once_per_instruction(arch, bp_type, per_call):
    """A debug exception is per instruction: x86's read-modify-write triggers once for "rw";
    a load and a store trigger one each."""
    async with Machine(arch=arch, cpus=2) as m:
        h = await m.hw_breakpoints.register_wide_hw_breakpoint(watch(m, bp_type), lambda *a: None)
        await fork_on_every_cpu(m, 20)
        assert h.hits == 40 * per_call


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "arm"])
async def test_instruction_breakpoint(arch):
    """An "x" breakpoint on do_fork triggers before each call's first instruction."""
    async with Machine(arch=arch, cpus=2) as m:
        ips = []
        h = await m.hw_breakpoints.register_wide_hw_breakpoint(
            HwBreakpointAttr(symbol_name="do_fork", bp_type="x", bp_len=m.hw_breakpoints.facts.inst_len),
            lambda bp, data, regs: ips.append(regs.ip))
        await fork_on_every_cpu(m, 10)
        assert ips == [m.kallsyms_lookup_name("do_fork")] * 20 and h.hits == 20


# == SMP ====================================================================================
@pytest.mark.parametrize("seed", [1, 2])
async def test_no_handler_after_unregister_returns(seed):
    """Unregistering while every CPU writes: once unregister_wide_hw_breakpoint returns, no
    handler runs on any CPU."""
    async with Machine(cpus=4, seed=seed) as m:
        done = []
        h = await m.hw_breakpoints.register_wide_hw_breakpoint(
            watch(m), lambda bp, data, regs: done and pytest.fail("handler after unregister"))
        async with trio.open_nursery() as n:
            n.start_soon(fork_on_every_cpu, m, 2000)
            await m.sleep_ns(0)
            assert h.hits > 0
            await m.hw_breakpoints.unregister_wide_hw_breakpoint(h)
            done.append(True)
        assert not m.hw_breakpoints.stale_triggers and not m.oopses
        assert m.debugfs.read("hw_breakpoint/list") == ""


@pytest.mark.parametrize("preempt", [False, True])
async def test_task_breakpoint_follows_its_task(preempt):
    """A per-task breakpoint fires for its task only, on whichever CPU it runs: exactly its
    own do_fork calls, while other tasks write the same counter."""
    async with Machine(cpus=4, seed=3, preempt=preempt) as m:
        cpus, others = set(), []
        task = m.spawn("fork_schedule_loop", 60)

        def triggered(bp, data, regs):
            if regs.cpu.current is not task:
                others.append(data.cpu)
            cpus.add(data.cpu)
        bp = await m.hw_breakpoints.register_user_hw_breakpoint(watch(m), triggered, task)
        async with trio.open_nursery() as n:
            n.start_soon(fork_on_every_cpu, m, 100)
            assert await task.wait() == 60
        assert bp.hits == 60 and others == [] and task.migrations > 0 and len(cpus) > 1
        await m.hw_breakpoints.unregister_hw_breakpoint(bp)


async def test_modify_user_breakpoint():
    """modify_user_hw_breakpoint moves a task's breakpoint; a bad attr is EINVAL and keeps it."""
    async with Machine(cpus=2) as m:
        task = m.spawn("fork_schedule_loop", 10)
        hits = []
        bp = await m.hw_breakpoints.register_user_hw_breakpoint(
            watch(m), lambda bp, data, regs: hits.append(m.format_addr(data.addr)), task)
        with pytest.raises(KprobeError, match="EINVAL"):
            await m.hw_breakpoints.modify_user_hw_breakpoint(bp, watch(m, "r"))
        await m.hw_breakpoints.modify_user_hw_breakpoint(
            bp, HwBreakpointAttr(symbol_name="last_pid", bp_type="rw"))
        await task.wait()
        assert hits == ["last_pid+0x0"] * 10      # lock xadd: one read-modify-write


async def test_debugfs_and_trace():
    """debugfs shows a line per breakpoint with the slots holding it; hits are traced."""
    async with Machine(cpus=2) as m:
        h = await m.hw_breakpoints.register_wide_hw_breakpoint(watch(m), lambda *a: None)
        await m.call("fork_loop", 2, cpu=1)
        a = m.kallsyms_lookup_name("watched_counter")
        assert m.debugfs.read("hw_breakpoint/list") == (
            f"{a:016x}  8  w   watched_counter+0x0  wide  cpu0:data0 cpu1:data0  hits=2\n")
        hits = [ev[:6] for ev in m.trace if ev[0] == "bp_hit"]
        assert hits == [("bp_hit", 1, a, a, "w", "trap")] * 2
        await m.hw_breakpoints.unregister_wide_hw_breakpoint(h)


# == scenarios and mutants =================================================================
@pytest.mark.parametrize("arch", DATA_ARCHES)
def test_data_breakpoint_prints_the_samples_output(arch):
    """data_breakpoint prints the sample's messages and a stack from do_fork, and passes."""
    from smpkprobes.tools import _stress
    out = _stress.run_once("data_breakpoint", ["--arch", arch, "--cpus", "2", "--size", "1"])
    assert out.ok, out.failures
    text = "\n".join(out.lines)
    assert text.count("watched_counter value is changed") == 2
    assert text.count("Dump stack from sample_hbp_handler") == 2
    assert "HW Breakpoint for watched_counter write installed" in text
    assert "HW Breakpoint for watched_counter write uninstalled" in text
    assert "Call Trace:\n do_fork+0x" in text


def test_data_breakpoint_on_sparc64_refuses_with_the_reason():
    """sparc64: "Breakpoint registration failed", and why."""
    from smpkprobes.tools import _stress
    out = _stress.run_once("data_breakpoint", ["--arch", "sparc64"])
    assert out.ok and out.lines[:2] == [
        "Breakpoint registration failed",
        "  ENOSYS: sparc64 has no hardware breakpoint support in Linux (no HAVE_HW_BREAKPOINT: "
        "its watchpoint registers are not driven by kernel/events/hw_breakpoint.c)"]


async def test_hw_breakpoint_mutants_change_only_their_own_machine():
    """A hw_breakpoint mutant is a subclass given to one machine (the `hw_breakpoint_core`
    seam): the runtime class is untouched and another machine gets the real subsystem."""
    from smpkprobes.hw_breakpoint._core import HwBreakpointSubsystem
    from smpkprobes.tools import _mutants
    before = dict(vars(HwBreakpointSubsystem))
    for name in ("wide_breakpoint_local_only", "slot_not_moved_with_task"):
        mutant = Machine(cpus=2, invariants=False, **_mutants.machine_options(name))
        plain = Machine(cpus=2, invariants=False)
        assert type(mutant.hw_breakpoints) is _mutants.get(name).hw_breakpoint_core
        assert type(plain.hw_breakpoints) is HwBreakpointSubsystem
    assert dict(vars(HwBreakpointSubsystem)) == before


async def test_trace_exports_show_breakpoints():
    """ftrace text and Perfetto show registrations and each trigger as an instant."""
    from smpkprobes.tools import _trace_export
    async with Machine(cpus=2) as m:
        h = await m.hw_breakpoints.register_wide_hw_breakpoint(watch(m), lambda *a: None)
        await m.call("fork_loop", 1, cpu=0)
        await m.hw_breakpoints.unregister_wide_hw_breakpoint(h)
    text = _trace_export.ftrace_text(m, kinds=["bp_register", "bp_hit", "bp_unregister"])
    assert [line.split(": ", 1)[1] for line in text.splitlines() if not line.startswith("#")] == [
        "hw_breakpoint_register: (watched_counter+0x0)/8:w wide",
        "hw_breakpoint: (watched_counter+0x0) access=w how=trap",
        "hw_breakpoint_unregister: (watched_counter+0x0)/8:w wide"]
    instants = sorted((e["tid"], e["name"]) for e in _trace_export.perfetto_events(m)
                      if e.get("cat") == "hw_breakpoint" and e["ph"] == "i")
    assert instants == [(0, "hw_breakpoint w watched_counter+0x0"),
                        (2, "bp_register watched_counter+0x0/8:w (wide)"),
                        (2, "bp_unregister watched_counter+0x0/8:w (wide)")]


def test_smpkprobes_trace_mem_event(capsys):
    """`smpkprobes trace 'mem:SYMBOL/LEN:w'` prints one line per write, perf's syntax."""
    from smpkprobes.tools import _cli
    assert _cli.main(["trace", "mem:watched_counter/8:w", "--cpus", "2", "--loops", "2"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 4 and all(
        line.endswith("mem:watched_counter: (do_fork+0x4) addr=0x200010 access=w")
        for line in lines)
    assert err.strip().endswith("# 4 lines; mem:watched_counter 4 hits")


@pytest.mark.parametrize("spec, attr", [
    ("mem:watched_counter", HwBreakpointAttr(symbol_name="watched_counter", bp_len=4, bp_type="rw")),
    ("mem:0x200010/8:w", HwBreakpointAttr(bp_addr=0x200010, bp_len=8, bp_type="w")),
    ("mem:do_fork:x", HwBreakpointAttr(symbol_name="do_fork", bp_len=8, bp_type="x"))])
def test_mem_event_syntax(spec, attr):
    """perf's defaults: rw, 4 bytes for data, sizeof(long) for x."""
    from smpkprobes.hw_breakpoint._perf import parse_mem_event
    assert parse_mem_event(spec, 8) == attr
    with pytest.raises(ValueError, match="x cannot be combined"):
        parse_mem_event("mem:do_fork:rx", 8)


def test_bench_watchpoint_rows():
    """`smpkprobes bench watchpoint` measures its three rows (figures are not asserted)."""
    from smpkprobes.tools._bench_hwbp import bench_watchpoint
    rows = bench_watchpoint(n=500, repeat=1)
    assert [r["what"].split(",")[0] for r in rows] == [
        "bare UC_HOOK_MEM_WRITE callback on the word", "watchpoint hit",
        "bench_loop with 4 breakpoints installed elsewhere (time ratio)"]
    assert rows[2]["ratio"] > 0


async def test_spawn_returns_a_task_handle():
    """m.spawn starts a task at once; task.wait() gives its result, as m.call would."""
    async with Machine(cpus=2) as m:
        t = m.spawn("kprobe_target", 30, cpu=1)
        assert await t.wait() == 10 and t.last_cpu == 1
        with pytest.raises(Oops):
            await m.spawn("null_deref").wait()


async def test_other_error_paths():
    """Unknown symbol ENOENT, unmapped EINVAL, a misaligned instruction breakpoint EINVAL, an
    exited task ESRCH, modifying what is not registered EINVAL, a non-attr TypeError."""
    async with Machine(arch="arm64", cpus=1) as m:
        hw, noop = m.hw_breakpoints, (lambda *a: None)
        cases = [(HwBreakpointAttr(symbol_name="no_such_thing"), errno.ENOENT, "unknown symbol"),
                 (HwBreakpointAttr(bp_addr=0x10), errno.EINVAL, "0x10 is not mapped"),
                 (HwBreakpointAttr(bp_addr=m.kallsyms_lookup_name("do_fork") + 2, bp_len=4,
                                   bp_type="x"), errno.EINVAL, "not an instruction address")]
        for attr, err, match in cases:
            with pytest.raises(KprobeError, match=match) as e:
                await hw.register_wide_hw_breakpoint(attr, noop)
            assert e.value.errno == err
        task = m.spawn("fork_loop", 1)
        await task.wait()
        with pytest.raises(KprobeError, match="has exited") as e:
            await hw.register_user_hw_breakpoint(watch(m), noop, task)
        assert e.value.errno == errno.ESRCH
        wide = await hw.register_wide_hw_breakpoint(watch(m), noop)
        with pytest.raises(KprobeError, match="not a registered user breakpoint"):
            await hw.modify_user_hw_breakpoint(wide[0], watch(m))
        with pytest.raises(TypeError, match="attr must be a HwBreakpointAttr"):
            await hw.register_wide_hw_breakpoint({"bp_addr": 0x200000}, noop)


async def test_disabled_breakpoint_holds_its_slot_but_does_not_trigger():
    """attr.disabled: registered (its slot reserved) but not installed; modify enables it."""
    async with Machine(cpus=1) as m:
        hw = m.hw_breakpoints
        wide = await hw.register_wide_hw_breakpoint(watch(m, disabled=True), lambda *a: None)
        await m.call("fork_loop", 3)
        assert (wide.hits, hw.installed(0), hw.constraints.in_use("data", 0)) == (0, [], 1)
        task = m.spawn("fork_schedule_loop", 5)
        bp = await hw.register_user_hw_breakpoint(watch(m, disabled=True), lambda *a: None, task)
        await hw.modify_user_hw_breakpoint(bp, watch(m))
        await task.wait()
        assert bp.hits == 5 and hw.constraints.in_use("data", 0) == 2


_OPS = st.lists(st.one_of(
    st.tuples(st.just("wide"), st.sampled_from(["w", "x"])),
    st.tuples(st.just("user"), st.sampled_from(["w", "x"]), st.integers(0, 1)),
    st.tuples(st.just("unregister"), st.integers(0, 20))), max_size=25)


@settings(max_examples=20, deadline=None)
@given(ops=_OPS)
@example(ops=[("user", "w", 0)] * 3 + [("wide", "x"), ("wide", "w"), ("user", "x", 1)])
@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_slot_table_follows_the_kernels_rule(arch, ops):
    """Any sequence of registrations and unregistrations (x86: 4 slots shared by data and
    instruction breakpoints; arm64: 4 watchpoints and 6 breakpoints per CPU): ENOSPC exactly
    when the kernel's rule says so (CPU-bound ones plus the busiest task's, or this task's,
    plus one, over the slots), and every CPU's registers hold exactly the wide breakpoints."""
    async def run():
        async with Machine(arch=arch, cpus=2, seed=1) as m:
            hw, noop = m.hw_breakpoints, (lambda *a: None)
            tasks = [m.spawn("msleep", 10_000) for _ in range(2)]
            attrs = {"w": watch(m), "x": HwBreakpointAttr(symbol_name="do_fork", bp_type="x",
                                                          bp_len=hw.facts.inst_len)}
            pool = hw.facts.pool_of
            slots = {t: hw.facts.nr_slots(pool(t)) for t in "wx"}
            live = []                        # (type, task index or None, handle)
            for op in ops:
                if op[0] == "unregister":
                    if not live:
                        continue
                    t, who, h = live.pop(op[1] % len(live))
                    await (hw.unregister_wide_hw_breakpoint(h) if who is None
                           else hw.unregister_hw_breakpoint(h))
                    continue
                t = op[1]
                who = op[2] if op[0] == "user" else None
                same = [w for x, w, _ in live if pool(x) == pool(t)]
                wide = same.count(None)
                per_task = [same.count(i) for i in range(2)]
                fits = wide + (max(per_task) if who is None else per_task[who]) + 1 <= slots[t]
                try:
                    h = await (hw.register_wide_hw_breakpoint(attrs[t], noop) if who is None else
                               hw.register_user_hw_breakpoint(attrs[t], noop, tasks[who]))
                except KprobeError as e:
                    assert not fits and e.errno == errno.ENOSPC
                else:
                    assert fits
                    live.append((t, who, h))
                for c in range(2):
                    assert sorted(id(bp) for _, _, bp in hw.installed(c)) == sorted(
                        id(h[c]) for _, w, h in live if w is None)
    trio.run(run)


async def test_modify_while_the_task_runs():
    """Modified while its task runs and migrates: the old watch ends, the new one begins,
    never both, and no CPU keeps the old range."""
    async with Machine(cpus=2, seed=4) as m:
        task = m.spawn("fork_schedule_loop", 300)
        seen = []
        bp = await m.hw_breakpoints.register_user_hw_breakpoint(
            watch(m), lambda bp, data, regs: seen.append(m.format_addr(data.addr)), task)
        await m.call("fork_schedule_loop", 20)
        await m.hw_breakpoints.modify_user_hw_breakpoint(
            bp, HwBreakpointAttr(symbol_name="last_pid", bp_type="rw"))
        await task.wait()
        n = seen.count("watched_counter+0x0")
        assert 0 < n < len(seen) <= 300 and seen[n:] == ["last_pid+0x0"] * (len(seen) - n)


async def test_a_cancelled_registration_is_not_left_half_done():
    """Registering and unregistering are shielded: cancelled while the cross-CPU calls are in
    flight, they still reach every CPU."""
    async with Machine(cpus=4, seed=2) as m:
        hw = m.hw_breakpoints
        async with trio.open_nursery() as n:
            for c in range(3):
                n.start_soon(functools.partial(m.call, "fork_loop", 20_000, cpu=c))
            await m.call("fork_loop", 10, cpu=3)     # CPUs 0-2 are busy now: IPIs, late
            with trio.CancelScope() as cs:
                cs.cancel()
                h = await hw.register_wide_hw_breakpoint(watch(m), lambda *a: None)
            assert [len(hw.installed(c)) for c in range(4)] == [1, 1, 1, 1]
            with trio.CancelScope() as cs:
                cs.cancel()
                await hw.unregister_wide_hw_breakpoint(h)
            assert [hw.installed(c) for c in range(4)] == [[], [], [], []]
            assert hw.constraints.in_use("data", 0) == 0


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
async def test_a_raising_handler_oopses_only_the_accessing_task(arch):
    """A triggered handler that raises oopses the task whose access triggered it, with the
    handler's exception as the cause (not as an internal error of the CPU's hook); the
    CPU's preemption count is back to 0 and the CPU runs the next task normally."""
    async with Machine(arch=arch, cpus=1, seed=3) as m:
        def triggered(bp, data, regs):
            raise ValueError("boom")
        h = await m.hw_breakpoints.register_wide_hw_breakpoint(watch(m), triggered)
        with pytest.raises(Oops, match=r"exception in the handler of <hw_breakpoint "
                                       r"0x[0-9a-f]+/\d:w cpu0>: ValueError: boom"):
            await m.call("fork_loop", 3, cpu=0)
        assert (h.hits, m.cpus[0].preempt_count, len(m.oopses)) == (1, 0, 1)
        await m.hw_breakpoints.unregister_wide_hw_breakpoint(h)
        before = word(m, "last_pid")
        await m.call("fork_loop", 3, cpu=0)
        assert word(m, "last_pid") - before == 3

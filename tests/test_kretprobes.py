"""kretprobes on x86_64: lib/test_kprobes.c ports, the instance pool, private data, task exit,
unregistering with calls in flight, and the stack traces seen from return handlers."""

import errno
import functools
import struct

import capstone
import pytest
import trio

from smpkprobes import Kprobe, KprobeError, Kretprobe, Machine, Oops, regs_return_value

ARCH = "x86_64"


@pytest.fixture
async def m():
    async with Machine(arch=ARCH, cpus=4, seed=1) as machine:
        yield machine


async def concurrently(*calls):
    """Run `m.call`-like partials at once; return their results in order."""
    results = [None] * len(calls)

    async def one(i, call):
        results[i] = await call()
    async with trio.open_nursery() as n:
        for i, call in enumerate(calls):
            n.start_soon(one, i, call)
    return results


def fib_calls(n: int) -> int:
    """How many calls fib(n) makes, itself included."""
    return 1 if n < 2 else 1 + fib_calls(n - 1) + fib_calls(n - 2)


def fib_pool_model(n: int, maxactive: int) -> int:
    """How many fib(n) calls get an instance from a pool of `maxactive` (one task, LIFO)."""
    free, handled = maxactive, 0

    def call(k):
        nonlocal free, handled
        got = free > 0
        free -= got
        if k >= 2:
            call(k - 1)
            call(k - 2)
        if got:
            free += 1
            handled += 1
    call(n)
    return handled


def conserved(rp: Kretprobe) -> bool:
    """The pool invariants while `rp` is registered."""
    s = rp.statistics()
    return (s.free + s.in_use == s.maxactive and s.taken == s.returned + s.in_use
            and sum(s.taken_per_cpu) == s.taken)


# -- lib/test_kprobes.c ports ---------------------------------------------------------
async def test_kretprobe(m):
    """test_kretprobe: entry handler sees the argument, return handler the return value."""
    seen = []

    def entry(ri, regs):
        seen.append(("entry", regs.arg(0), regs.cpu.preemptible()))

    def ret(ri, regs):
        seen.append(("ret", regs_return_value(regs), regs.cpu.preemptible(), ri.rp is rp,
                     ri.ret_addr, regs.ip, ri.task.comm))
    rp = Kretprobe(handler=ret, entry_handler=entry, symbol_name="kprobe_target")
    await m.kprobes.register_kretprobe(rp)
    assert await m.call("kprobe_target", 0x1234) == 0x1234 // 3
    await m.kprobes.unregister_kretprobe(rp)
    task_return = m.kallsyms_lookup_name("__hc_task_return")
    assert seen == [("entry", 0x1234, False),
                    ("ret", 0x1234 // 3, False, True, task_return, task_return, "kprobe_target")]
    assert rp.nmissed == 0


async def test_kretprobes_batch_of_two(m):
    """test_kretprobes: a batch of two return probes each see their function's value."""
    seen = []
    rps = [Kretprobe(handler=lambda ri, regs: seen.append((ri.rp.kp.symbol_name,
                                                           regs_return_value(regs))),
                     entry_handler=lambda ri, regs: seen.append(ri.rp.kp.symbol_name),
                     symbol_name=s)
           for s in ("kprobe_target", "kprobe_target2")]
    await m.kprobes.register_kretprobes(rps)
    assert await m.call("kprobe_target", 30) == 10
    assert await m.call("kprobe_target2", 30) == 11
    await m.kprobes.unregister_kretprobes(rps)
    assert seen == ["kprobe_target", ("kprobe_target", 10),
                    "kprobe_target2", ("kprobe_target2", 11)]
    assert [rp.kp.registered for rp in rps] == [False, False]


async def target_return_addresses(m) -> tuple[int, int]:
    """Run stacktrace_driver unprobed once so that target_return_address[] is filled in."""
    driver_ret = await m.call("stacktrace_driver")
    assert m.symbolize(driver_ret)[0] == "__hc_task_return"
    raw = m.read_memory(m.kallsyms_lookup_name("target_return_address"), 16)
    internal_ret, target_ret = struct.unpack("<2Q", raw)
    assert m.symbolize(internal_ret)[0] == "stacktrace_target"
    assert m.symbolize(target_ret)[0] == "stacktrace_driver"
    return internal_ret, target_ret


async def test_stacktrace_on_kretprobe(m):
    """test_stacktrace_on_kretprobe: the trace in a return handler starts at the real return
    address and never shows the trampoline."""
    _, target_ret = await target_return_addresses(m)
    task_return = m.kallsyms_lookup_name("__hc_task_return")
    seen = []
    rp = Kretprobe(handler=lambda ri, regs: seen.append(
        (regs_return_value(regs), regs.ip, ri.ret_addr, regs.stack_trace())),
        symbol_name="stacktrace_target")
    await m.kprobes.register_kretprobe(rp)
    assert await m.call("stacktrace_driver") == task_return
    await m.kprobes.unregister_kretprobe(rp)
    assert seen == [(target_ret, target_ret, target_ret, [target_ret, task_return])]


async def test_stacktrace_on_nested_kretprobe(m):
    """test_stacktrace_on_nested_kretprobe: with both targets probed, the inner handler's
    trace resolves the outer trampoline to the outer real return address."""
    internal_ret, target_ret = await target_return_addresses(m)
    task_return = m.kallsyms_lookup_name("__hc_task_return")
    seen = []

    def handler(ri, regs):
        seen.append((ri.rp.kp.symbol_name, regs_return_value(regs), regs.ip, regs.stack_trace()))
    rps = [Kretprobe(handler=handler, symbol_name="stacktrace_internal_target"),
           Kretprobe(handler=handler, symbol_name="stacktrace_target")]
    await m.kprobes.register_kretprobes(rps)
    assert await m.call("stacktrace_driver") == task_return
    await m.kprobes.unregister_kretprobes(rps)
    assert seen == [
        ("stacktrace_internal_target", internal_ret, internal_ret,
         [internal_ret, target_ret, task_return]),
        ("stacktrace_target", target_ret, target_ret, [target_ret, task_return]),
    ]


async def test_stack_traces_in_recursion_resolve_every_trampoline(m):
    """In fib's return handlers, every frame (all with trampolines) shows a real address."""
    task_return = m.kallsyms_lookup_name("__hc_task_return")
    depth = [0]
    bad = []
    returns = []

    def entry(ri, regs):
        ri.data[:] = depth[0].to_bytes(8, "little")
        depth[0] += 1

    def ret(ri, regs):
        depth[0] -= 1
        d = int.from_bytes(ri.data, "little")
        trace = regs.stack_trace()
        returns.append(d)
        if d == 0:
            return      # see test_stack_trace_after_the_outermost_return
        want_len = d + 1     # this frame's caller chain: d fib frames, then the task
        if (len(trace) != want_len or trace[0] != regs.ip or trace[-1] != task_return
                or any(m.symbolize(a)[0] != "fib" for a in trace[:-1])):
            bad.append((d, [m.format_addr(a) for a in trace]))
    rp = Kretprobe(handler=ret, entry_handler=entry, data_size=8, maxactive=64,
                   symbol_name="fib")
    await m.kprobes.register_kretprobe(rp)
    assert await m.call("fib", 9) == 34
    await m.kprobes.unregister_kretprobe(rp)
    assert bad == []
    assert len(returns) == fib_calls(9) and max(returns) == 8


async def test_stack_trace_after_the_outermost_return(m):
    """A return handler for the task's outermost frame sees only the task-return address."""
    traces = []
    rp = Kretprobe(handler=lambda ri, regs: traces.append(regs.stack_trace()),
                   symbol_name="kprobe_target")
    await m.kprobes.register_kretprobe(rp)
    await m.call("kprobe_target", 3)
    await m.kprobes.unregister_kretprobe(rp)
    assert traces == [[m.kallsyms_lookup_name("__hc_task_return")]]


# -- maxactive ------------------------------------------------------------------------
@pytest.mark.parametrize("ncpus, preempt, expected", [(4, False, 4), (1, False, 1),
                                                      (4, True, 10), (8, True, 16)])
async def test_default_maxactive(ncpus, preempt, expected):
    """maxactive <= 0 becomes NR_CPUS, or max(10, 2*NR_CPUS) with preemption."""
    async with Machine(arch=ARCH, cpus=ncpus, seed=1, preempt=preempt) as m:
        rp = Kretprobe(handler=lambda ri, regs: None, symbol_name="kprobe_target")
        await m.kprobes.register_kretprobe(rp)
        s = rp.statistics()
        assert (rp.maxactive, s.maxactive, s.free, s.in_use) == (expected, expected, expected, 0)
        await m.kprobes.unregister_kretprobe(rp)


async def test_nr_cpus_instances_suffice_for_a_guest_loop_on_every_cpu(m):
    """Without preemption, NR_CPUS instances never run out: one call in flight per CPU."""
    rets = []
    rp = Kretprobe(handler=lambda ri, regs: rets.append(regs_return_value(regs)),
                   symbol_name="bench_target")
    await m.kprobes.register_kretprobe(rp)
    sums = await concurrently(*(functools.partial(m.call, "bench_loop", 200, cpu=c)
                                for c in range(4)))
    s = rp.statistics()
    assert conserved(rp)
    await m.kprobes.unregister_kretprobe(rp)
    assert sums == [200 * 200] * 4
    assert rp.nmissed == 0 and len(rets) == 800
    assert sorted(rets) == sorted(2 * i + 1 for i in range(200) for _ in range(4))
    assert (s.maxactive, s.free, s.taken, s.returned, s.taken_per_cpu) == \
        (4, 4, 800, 800, (200, 200, 200, 200))
    assert 2 <= s.high_water <= 4      # the CPUs really overlapped, never more than 4


async def test_nr_cpus_instances_suffice_for_many_tasks_per_cpu(m):
    """50 concurrent tasks pinned to each of 4 CPUs: every call is handled, none missed."""
    rets = []
    rp = Kretprobe(handler=lambda ri, regs: rets.append((ri.task.pid, regs_return_value(regs))),
                   symbol_name="kprobe_target")
    await m.kprobes.register_kretprobe(rp)
    calls = [functools.partial(m.call, "kprobe_target", 3 * i + c, cpu=c)
             for c in range(4) for i in range(50)]
    results = await concurrently(*calls)
    s = rp.statistics()
    await m.kprobes.unregister_kretprobe(rp)
    assert results == [(3 * i + c) // 3 for c in range(4) for i in range(50)]
    assert rp.nmissed == 0 and len(rets) == 200 and len({pid for pid, _ in rets}) == 200
    assert sorted(v for _, v in rets) == sorted(results)
    assert (s.free, s.in_use, s.taken, s.taken_per_cpu) == (4, 0, 200, (50, 50, 50, 50))


async def test_sleeping_tasks_exhaust_a_small_pool(m):
    """12 tasks asleep inside sleepy with maxactive=2: 2 handled, 10 missed, all return."""
    rets = []
    rp = Kretprobe(handler=lambda ri, regs: rets.append(regs_return_value(regs)),
                   maxactive=2, symbol_name="sleepy")
    await m.kprobes.register_kretprobe(rp)
    results = await concurrently(*(functools.partial(m.call, "sleepy", 3) for _ in range(12)))
    s = rp.statistics()
    await m.kprobes.unregister_kretprobe(rp)
    assert results == [3] * 12
    assert rets == [3, 3] and rp.nmissed == 10 and len(rets) + rp.nmissed == 12
    assert (s.free, s.in_use, s.taken, s.returned, s.missed, s.high_water) == (2, 0, 2, 2, 10, 2)


@pytest.mark.parametrize("n, maxactive", [(10, 3), (8, 1), (7, 20)])
async def test_recursion_takes_instances_lifo(m, n, maxactive):
    """fib(n) with a small pool: handled + nmissed == number of calls, handled as modelled."""
    rets = []
    rp = Kretprobe(handler=lambda ri, regs: rets.append(regs_return_value(regs)),
                   maxactive=maxactive, symbol_name="fib")
    await m.kprobes.register_kretprobe(rp)
    result = await m.call("fib", n)
    s = rp.statistics()
    await m.kprobes.unregister_kretprobe(rp)
    fib = [0, 1]
    while len(fib) <= n:
        fib.append(fib[-1] + fib[-2])
    assert result == fib[n]
    assert len(rets) == fib_pool_model(n, maxactive)
    assert len(rets) + rp.nmissed == fib_calls(n)
    assert rets[-1] == fib[n]      # the outermost call always got an instance
    assert (s.free, s.in_use, s.high_water) == (maxactive, 0, min(maxactive, n))


# -- entry_handler and private data -----------------------------------------------------
async def test_entry_handler_nonzero_skips_the_return_handler(m):
    """An entry_handler returning non-zero: no return handler, the instance is back at once."""
    entries, rets = [], []

    def entry(ri, regs):
        entries.append(regs.arg(0))
        return regs.arg(0) % 2          # odd arguments: no return probe

    rp = Kretprobe(handler=lambda ri, regs: rets.append(regs_return_value(regs)),
                   entry_handler=entry, maxactive=1, symbol_name="kprobe_target")
    await m.kprobes.register_kretprobe(rp)
    for v in range(6):
        assert await m.call("kprobe_target", 3 * v) == v
    s = rp.statistics()
    await m.kprobes.unregister_kretprobe(rp)
    assert entries == [0, 3, 6, 9, 12, 15]
    assert rets == [0, 2, 4]
    assert (s.free, s.in_use, s.taken, s.returned, s.missed) == (1, 0, 6, 6, 0)


async def test_private_data_follows_each_call_across_migration():
    """ri.data written at entry is read back by the same call's return handler, for 40
    sleeping calls on a preempting, migrating machine."""
    async with Machine(arch=ARCH, cpus=4, seed=3, preempt=True) as m:
        checked = []

        def entry(ri, regs):
            assert len(ri.data) == 24
            ri.data[:] = struct.pack("<3Q", regs.arg(0), ri.task.pid, regs.cpu.id)

        def ret(ri, regs):
            ms, pid, cpu = struct.unpack("<3Q", ri.data)
            checked.append((ms == regs_return_value(regs), pid == ri.task.pid,
                            cpu != regs.cpu.id))
        rp = Kretprobe(handler=ret, entry_handler=entry, data_size=24, maxactive=40,
                       symbol_name="sleepy")
        await m.kprobes.register_kretprobe(rp)
        results = await concurrently(*(functools.partial(m.call, "sleepy", ms)
                                       for ms in range(1, 41)))
        assert conserved(rp)
        await m.kprobes.unregister_kretprobe(rp)
        assert results == list(range(1, 41))
        assert len(checked) == 40 and rp.nmissed == 0
        assert all(ok_ms and ok_pid for ok_ms, ok_pid, _ in checked)
        moved = sum(moved for _, _, moved in checked)
        assert moved > 0 and m.statistics().migrations >= moved


async def test_virtual_time_never_runs_backwards_within_a_call(m):
    """now_ns() stamped at entry (the kretprobe_example idiom) is never later than at return."""
    deltas = []

    def entry(ri, regs):
        ri.data[:] = regs.cpu.now_ns().to_bytes(8, "little")

    def ret(ri, regs):
        deltas.append(regs.cpu.now_ns() - int.from_bytes(ri.data, "little"))
    rp = Kretprobe(handler=ret, entry_handler=entry, data_size=8, symbol_name="do_fork")
    await m.kprobes.register_kretprobe(rp)
    await concurrently(*(functools.partial(m.call, "fork_loop", 100, cpu=c) for c in range(4)))
    await m.kprobes.unregister_kretprobe(rp)
    assert len(deltas) == 400 and min(deltas) >= 0


async def test_data_size_limit(m):
    """data_size over 4096 is E2BIG (however large); exactly 4096 is accepted."""
    for size in (4097, 1 << 40):
        rp = Kretprobe(handler=lambda ri, regs: None, data_size=size, symbol_name="kprobe_target")
        with pytest.raises(KprobeError, match="E2BIG") as err:
            await m.kprobes.register_kretprobe(rp)
        assert err.value.errno == errno.E2BIG and not rp.kp.registered
    sizes = []
    rp = Kretprobe(handler=lambda ri, regs: sizes.append(len(ri.data)), data_size=4096,
                   symbol_name="kprobe_target")
    await m.kprobes.register_kretprobe(rp)
    await m.call("kprobe_target", 3)
    await m.kprobes.unregister_kretprobe(rp)
    assert sizes == [4096]


# -- registration errors ----------------------------------------------------------------
def second_insn_offset(m, name: str) -> int:
    addr = m.kallsyms_lookup_name(name)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return next(md.disasm(m.read_memory(addr, 16), addr, 1)).size


async def test_kretprobe_must_be_at_function_entry(m):
    """A kretprobe at offset != 0 is EINVAL, though a kprobe there is fine."""
    off = second_insn_offset(m, "kprobe_target")
    kp = Kprobe(symbol_name="kprobe_target", offset=off)
    await m.kprobes.register_kprobe(kp)
    await m.kprobes.unregister_kprobe(kp)
    rp = Kretprobe(handler=lambda ri, regs: None, symbol_name="kprobe_target")
    rp.kp.offset = off
    with pytest.raises(KprobeError, match="function entry") as err:
        await m.kprobes.register_kretprobe(rp)
    assert err.value.errno == errno.EINVAL and not rp.kp.registered
    assert m.kprobes.probes() == []


async def test_kretprobe_refuses_switch_to(m):
    """register_kretprobe on __switch_to is EINVAL; a plain kprobe there is allowed."""
    rp = Kretprobe(handler=lambda ri, regs: None, symbol_name="__switch_to")
    with pytest.raises(KprobeError, match="kretprobes may not probe __switch_to") as err:
        await m.kprobes.register_kretprobe(rp)
    assert err.value.errno == errno.EINVAL
    kp = Kprobe(symbol_name="__switch_to")
    await m.kprobes.register_kprobe(kp)
    await m.kprobes.unregister_kprobe(kp)


async def test_double_registration_keeps_the_live_pool(m):
    """Registering a registered kretprobe again is EINVAL and leaves its in-flight instances
    and pool alone."""
    rets = []
    rp = Kretprobe(handler=lambda ri, regs: rets.append(regs_return_value(regs)),
                   maxactive=3, symbol_name="sleepy")
    await m.kprobes.register_kretprobe(rp)
    async with trio.open_nursery() as n:
        for _ in range(2):
            n.start_soon(m.call, "sleepy", 20)
        await m.sleep_ns(1_000_000)            # both are asleep inside sleepy now
        before = rp.statistics()
        with pytest.raises(KprobeError, match="already registered") as err:
            await m.kprobes.register_kretprobe(rp)
        assert err.value.errno == errno.EINVAL
        assert rp.statistics() == before and (before.in_use, before.free) == (2, 1)
    assert rets == [20, 20]
    assert await m.call("sleepy", 1) == 1 and rets == [20, 20, 1]
    s = rp.statistics()
    await m.kprobes.unregister_kretprobe(rp)
    assert (s.free, s.in_use, s.taken, s.returned, s.missed) == (3, 0, 3, 3, 0)


@pytest.mark.parametrize("bad, code", [(dict(symbol_name="__switch_to"), errno.EINVAL),
                                       (dict(symbol_name="no_such_function"), errno.ENOENT),
                                       (dict(symbol_name="watched_counter"), errno.EINVAL),
                                       (dict(symbol_name="kprobe_target", data_size=5000),
                                        errno.E2BIG)])
async def test_a_refused_kretprobe_keeps_no_instances_and_can_be_fixed(m, bad, code):
    """A registration refused after its pool was filled (free_rp_inst on the error path)
    keeps no instance; fixed, the same kretprobe registers with a full pool and works."""
    rp = Kretprobe(handler=lambda ri, regs: rets.append(regs_return_value(regs)),
                   maxactive=4, **bad)
    rets = []
    with pytest.raises(KprobeError) as err:
        await m.kprobes.register_kretprobe(rp)
    assert err.value.errno == code and not rp.kp.registered
    s = rp.statistics()
    assert (s.maxactive, s.free, s.in_use, s.taken) == (4, 0, 0, 0)
    rp.kp.symbol_name, rp.kp.addr, rp.data_size = "kprobe_target", None, 8
    await m.kprobes.register_kretprobe(rp)
    assert rp.statistics().free == 4
    assert await m.call("kprobe_target", 30) == 10 and rets == [10]
    await m.kprobes.unregister_kretprobe(rp)
    assert m.kprobes.probes() == []

# -- several probes at one entry --------------------------------------------------------
async def test_several_kretprobes_on_one_function(m):
    """Three kretprobes on one function: each handler runs once, oldest first, each with the
    real return address and value."""
    seen = []
    rps = [Kretprobe(handler=lambda ri, regs, i=i: seen.append((i, ri.ret_addr, regs.ip,
                                                                regs_return_value(regs))),
                     symbol_name="kprobe_target") for i in range(3)]
    for rp in rps:
        await m.kprobes.register_kretprobe(rp)
    assert await m.call("kprobe_target", 30) == 10
    await m.kprobes.unregister_kretprobe(rps[1])
    assert await m.call("kprobe_target", 60) == 20
    await m.kprobes.unregister_kretprobes([rps[0], rps[2]])
    assert await m.call("kprobe_target", 90) == 30
    r = m.kallsyms_lookup_name("__hc_task_return")
    assert seen == [(0, r, r, 10), (1, r, r, 10), (2, r, r, 10), (0, r, r, 20), (2, r, r, 20)]
    assert [rp.statistics().taken for rp in rps] == [2, 1, 2]


async def test_kretprobe_and_kprobe_on_one_entry(m):
    """A kprobe and a kretprobe on one entry form an aggregate; each keeps working alone."""
    addr = m.kallsyms_lookup_name("kprobe_target")
    orig = m.read_memory(addr, 1)
    seen = []
    kp = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, regs: seen.append(
        ("k", regs.arg(0))))
    rp = Kretprobe(handler=lambda ri, regs: seen.append(("r", regs_return_value(regs))),
                   symbol_name="kprobe_target")
    await m.kprobes.register_kretprobe(rp)
    await m.kprobes.register_kprobe(kp)
    listing = m.debugfs.read("kprobes/list")
    assert listing == (f"{addr:016x}  k  kprobe_target+0x0\n"
                       f"{addr:016x}  r  kprobe_target+0x0\n")
    assert await m.call("kprobe_target", 9) == 3
    await m.kprobes.unregister_kprobe(kp)
    assert await m.call("kprobe_target", 12) == 4
    assert m.read_memory(addr, 1) != orig        # still armed for the kretprobe
    await m.kprobes.unregister_kretprobe(rp)
    assert m.read_memory(addr, 1) == orig
    assert await m.call("kprobe_target", 15) == 5
    assert seen == [("k", 9), ("r", 3), ("r", 4)]


# -- task exit, oops, unregister in flight ------------------------------------------------
async def test_task_exit_inside_recycles_instances(m):
    """A task that exits inside probed functions never returns through them: its instances
    go back to the pools, and no handler runs."""
    rets = []
    rps = [Kretprobe(handler=lambda ri, regs: rets.append(ri.rp.kp.symbol_name),
                     maxactive=2, symbol_name=s) for s in ("exit_inside", "do_exit")]
    await m.kprobes.register_kretprobes(rps)
    for code in (7, -3, 5):
        assert await m.call("exit_inside", code) == code
    stats = [rp.statistics() for rp in rps]
    await m.kprobes.unregister_kretprobes(rps)
    assert rets == []
    for s in stats:
        assert (s.free, s.in_use, s.taken, s.returned, s.missed) == (2, 0, 3, 3, 0)


async def test_oops_inside_probed_function_recycles_the_instance(m):
    """A task killed by a fault inside a probed function gives its instance back."""
    rets = []
    rp = Kretprobe(handler=lambda ri, regs: rets.append(1), maxactive=1,
                   symbol_name="null_deref")
    await m.kprobes.register_kretprobe(rp)
    for _ in range(2):
        with pytest.raises(Oops, match="guest fault"):
            await m.call("null_deref")
    s = rp.statistics()
    await m.kprobes.unregister_kretprobe(rp)
    assert rets == [] and len(m.oopses) == 2
    assert (s.free, s.in_use, s.taken, s.returned, s.missed) == (1, 0, 2, 2, 0)


async def test_unregister_orphans_instances_in_flight(m):
    """Unregistering with tasks asleep inside: they still return the right values, through the
    right addresses, and no handler runs after unregister returned."""
    events = []
    rp = Kretprobe(handler=lambda ri, regs: events.append(("ret", regs_return_value(regs))),
                   entry_handler=lambda ri, regs: events.append(("entry", regs.arg(0))),
                   maxactive=8, symbol_name="sleepy")
    await m.kprobes.register_kretprobe(rp)
    async with trio.open_nursery() as n:
        results = {}

        async def sleeper(ms):
            results[ms] = await m.call("sleepy", ms)
        for ms in (40, 50, 60, 70, 80):
            n.start_soon(sleeper, ms)
        await m.sleep_ns(1_000_000)        # every sleeper is inside sleepy by now
        during = rp.statistics()
        await m.kprobes.unregister_kretprobe(rp)
        events.append("unregistered")
    assert results == {40: 40, 50: 50, 60: 60, 70: 70, 80: 80}
    assert sorted(events[:-1]) == [("entry", ms) for ms in (40, 50, 60, 70, 80)]
    assert events[-1] == "unregistered"
    assert (during.in_use, during.free, during.taken) == (5, 3, 5)
    s = rp.statistics()
    assert (s.free, s.in_use) == (0, 0)          # the pool is released
    assert m.kprobes.simulation_errors == [] and m.oopses == []
    # The orphans did not come back into the pool of a later registration.
    rp.kp.addr = None
    await m.kprobes.register_kretprobe(rp)
    assert await m.call("sleepy", 2) == 2
    s = rp.statistics()
    await m.kprobes.unregister_kretprobe(rp)
    assert events[-1] == ("ret", 2)
    assert (s.maxactive, s.free, s.in_use, s.taken, s.returned) == (8, 8, 0, 1, 1)


async def test_failed_batch_orphans_the_instances_of_rolled_back_kretprobes(m):
    """register_kretprobes failing at its second probe unregisters the first: tasks that
    entered the first meanwhile return correctly, and its handler never runs afterwards."""
    after = []
    failed = [False]
    # A disabled kprobe keeps msleep's site (and slot) alive, so registering rp0 only has
    # to arm it; tasks admitted while that waits for the busy CPU 0 enter msleep probed.
    holder = Kprobe(symbol_name="msleep")
    await m.kprobes.register_kprobe(holder)
    await m.kprobes.disable_kprobe(holder)
    rp0 = Kretprobe(handler=lambda ri, regs: after.append(failed[0]), maxactive=8,
                    symbol_name="msleep")
    rp1 = Kretprobe(handler=lambda ri, regs: None, symbol_name="no_such_function")
    results = []
    async with trio.open_nursery() as n:
        n.start_soon(functools.partial(m.call, "bench_loop", 100_000, cpu=0))
        await m.sleep_ns(0)

        async def sleeper(cpu):
            results.append(await m.call("msleep", 50, cpu=cpu))
        for cpu in (1, 2, 3):
            n.start_soon(sleeper, cpu)
        with pytest.raises(KprobeError, match="ENOENT") as err:
            await m.kprobes.register_kretprobes([rp0, rp1])
        failed[0] = True
        assert err.value.index == 1 and not rp0.kp.registered
        assert rp0.statistics().taken == 3         # the precondition: three calls in flight
    await m.kprobes.unregister_kprobe(holder)
    assert results == [0, 0, 0]
    assert True not in after


async def test_probes_hit_in_a_return_handler_are_missed(m):
    """A return handler calling a kprobe'd function: that kprobe's handlers do not run, its
    nmissed counts the hit, and the nested call returns its value."""
    pre = []
    nested = []
    kp = Kprobe(symbol_name="kprobe_target2", pre_handler=lambda p, regs: pre.append(regs.arg(0)))
    rp2 = Kretprobe(handler=lambda ri, regs: pre.append("rp2"), symbol_name="kprobe_target2")
    rp = Kretprobe(handler=lambda ri, regs: nested.append(regs.cpu.call("kprobe_target2", 9)),
                   symbol_name="kprobe_target")
    await m.kprobes.register_kprobe(kp)
    await m.kprobes.register_kretprobe(rp2)
    await m.kprobes.register_kretprobe(rp)
    assert await m.call("kprobe_target", 30) == 10
    assert (nested, pre, kp.nmissed, rp2.kp.nmissed, rp2.statistics().taken) == ([4], [], 1, 1, 0)
    assert await m.call("kprobe_target2", 30) == 11      # outside a handler it fires
    await m.kprobes.unregister_kretprobes([rp, rp2])
    await m.kprobes.unregister_kprobe(kp)
    assert pre == [30, "rp2"] and kp.nmissed == 1


async def test_return_to_trampoline_without_instance_is_a_kretprobe_bug(m):
    """Reaching the trampoline with no instance reports "kretprobe BUG!" as an oops and a
    simulation error; the machine goes on."""
    tramp = m.kallsyms_lookup_name("kretprobe_trampoline")
    with pytest.raises(Oops, match="kretprobe BUG!") as err:
        await m.call("kretprobe_trampoline")
    want = f"kretprobe BUG!: Processing kretprobe trampoline @ {tramp:#x}"
    assert len(m.kprobes.simulation_errors) == 1
    assert m.kprobes.simulation_errors[0].startswith(want)
    assert any(line.startswith(want) for line in m.printk_log)
    assert err.value.record.cause == m.kprobes.simulation_errors[0]
    assert await m.call("kprobe_target", 6) == 2


# -- pool accounting ----------------------------------------------------------------------
async def test_pool_statistics_are_conserved(m):
    """Hits, misses, skips, returns and exits: free + in_use == maxactive, taken == returned +
    in_use, and taken + missed == hits, at every point we look."""
    entries, rets = [], []

    def entry(ri, regs):
        entries.append(regs.arg(0))
        return regs.arg(0) % 4 == 0        # a skip returns the instance at once

    rp = Kretprobe(handler=lambda ri, regs: rets.append(regs_return_value(regs)),
                   entry_handler=entry, maxactive=3, symbol_name="sleepy")
    await m.kprobes.register_kretprobe(rp)
    assert conserved(rp)
    async with trio.open_nursery() as n:
        for ms in range(20, 30):
            n.start_soon(m.call, "sleepy", ms)
        await m.sleep_ns(1_000_000)
        mid = rp.statistics()
        assert conserved(rp)
        assert mid.in_use == 3 and mid.free == 0
        assert mid.taken + mid.missed == 10
        assert mid.taken == len(entries) and mid.returned == sum(e % 4 == 0 for e in entries)
    end = rp.statistics()
    assert conserved(rp)
    await m.kprobes.unregister_kretprobe(rp)
    assert end.taken + end.missed == 10 and end.missed == rp.nmissed
    assert (end.free, end.in_use, end.returned, end.high_water) == (3, 0, end.taken, 3)
    assert sorted(rets) == sorted(e for e in entries if e % 4)
    assert len(rets) == 3


# -- the return side without a trap (jump optimization on) ------------------------------------
# While debug.kprobes-optimization is 1 the trampoline is entered through a code hook on its
# first instruction (as x86's code trampoline: no int3); with 0 its breakpoint traps.  Both run
# the same trampoline_handler, so everything a user can see must be the same but the traps.

async def _returns_seen(sysctl: str, arch: str = ARCH) -> tuple:
    """A seeded workload seen from the handlers, with the traps it took: recursion with a
    small pool (one task: LIFO decides who gets an instance), sleepers on two CPUs, a task
    exiting inside a probed function."""
    async with Machine(arch=arch, cpus=2, seed=7, trap_delay=0) as m:
        await m.sysctl.write("debug/kprobes-optimization", sysctl)
        seen = []

        def entry(ri, regs):
            ri.data[0] = regs.arg(0) & 0xFF
            seen.append(("entry", ri.rp.kp.symbol_name, regs.arg(0), ri.task.pid))

        def ret(ri, regs):
            seen.append(("ret", ri.rp.kp.symbol_name, regs_return_value(regs), ri.data[0],
                         ri.ret_addr, regs.ip, ri.task.pid, regs.stack_trace()))
        rps = [Kretprobe(handler=ret, entry_handler=entry, data_size=1, maxactive=n,
                         symbol_name=s) for s, n in (("fib", 3), ("sleepy", 8),
                                                     ("exit_inside", 1))]
        await m.kprobes.register_kretprobes(rps)
        await m.kprobes.optimizer.wait_for_kprobe_optimizer()
        optimized = [m.kprobes.optimizer.is_optimized(rp.kp.addr) for rp in rps]
        traps0 = m.statistics().traps
        results = [await m.call("fib", 6, cpu=0)]
        results += await concurrently(*(functools.partial(m.call, "sleepy", 2 + i, cpu=i % 2)
                                        for i in range(4)))
        results.append(await m.call("exit_inside", 9, cpu=1))
        traps = m.statistics().traps - traps0
        stats = [rp.statistics() for rp in rps]
        await m.kprobes.unregister_kretprobes(rps)
        # The sleepers interleave as the timing has it: each task's own calls, in order,
        # tasks numbered as they first appear (pids depend on what else the host ran).
        pid = lambda e: e[3] if e[0] == "entry" else e[6]      # noqa: E731
        order = {p: i for i, p in enumerate(dict.fromkeys(pid(e) for e in seen))}
        by_task = sorted(seen, key=lambda e: order[pid(e)])
        by_task = [e[:3] + (order[e[3]],) if e[0] == "entry" else
                   e[:6] + (order[e[6]],) + e[7:] for e in by_task]
        return results, by_task, stats, [rp.nmissed for rp in rps], traps, m.oopses, optimized


@pytest.mark.parametrize("arch", ["x86_64", "i386", "arm", "ppc"])
async def test_trap_free_returns_are_the_trapping_ones_but_for_the_traps(arch):
    """The same seeded workload with the trampoline trapping (sysctl 0) and trap-free (1):
    identical results, handler calls (LIFO order, private data, regs.ip, stack traces), pool
    statistics and nmissed; the trap-free run takes no trap at all (entries optimized too),
    the trapping one takes one per entry and per return."""
    trapped = await _returns_seen("0", arch)
    free = await _returns_seen("1", arch)
    assert free[:4] == trapped[:4]
    results, seen, stats, nmissed, traps, oopses, optimized = free
    assert results == [8, 2, 3, 4, 5, 9] and not oopses
    assert nmissed[0] > 0                            # fib's small pool ran out
    entries = sum(s.taken for s in stats)
    returns = sum(1 for e in seen if e[0] == "ret")
    assert returns == entries - 1                    # exit_inside never returns
    assert not any(trapped[6]) and optimized[0]      # (fib's entry is always optimizable)
    # Trap-free: only the entries the optimizer could not take (if any) trap, never a return.
    assert traps == sum(s.entries for s, opt in zip(stats, optimized) if not opt)
    assert trapped[4] == sum(s.entries for s in stats) + returns


async def test_trap_free_returns_leave_the_guest_as_unprobed():
    """Differential: with the kretprobes armed, trap-free or trapping, the guest computes what
    it computes unprobed, and each CPU sees the same returns, in the same order."""
    async def run(sysctl, probed):
        async with Machine(arch=ARCH, cpus=2, seed=3, trap_delay=0) as m:
            await m.sysctl.write("debug/kprobes-optimization", sysctl)
            rps = [Kretprobe(handler=lambda ri, regs: None, symbol_name=s, maxactive=20)
                   for s in ("fib", "kprobe_target")] if probed else []
            if rps:
                await m.kprobes.register_kretprobes(rps)
                await m.kprobes.optimizer.wait_for_kprobe_optimizer()
            out = await concurrently(functools.partial(m.call, "fib", 9, cpu=0),
                                     functools.partial(m.call, "kprobe_target", 99, cpu=1))
            rets = [[e[2] for e in m.trace if e[0] == "ret" and e[1] == c] for c in (0, 1)]
            return out, rets, m.oopses
    plain, none, _ = await run("1", False)
    trapping, trapping_rets, oops1 = await run("0", True)
    free, free_rets, oops2 = await run("1", True)
    assert plain == trapping == free == [34, 33] and not (oops1 or oops2)
    assert none == [[], []]
    assert free_rets == trapping_rets
    assert [len(r) for r in free_rets] == [fib_calls(9), 1]


@pytest.mark.parametrize("sysctl", ["0", "1"])
async def test_the_trampoline_refuses_probes_either_way(sysctl):
    """No probe may sit on the trampoline, trapping or not (EINVAL), and it stays free of
    breakpoints of ours: kretprobes still return through it."""
    async with Machine(arch=ARCH, cpus=1, seed=1) as m:
        await m.sysctl.write("debug/kprobes-optimization", sysctl)
        tramp = m.kallsyms_lookup_name("kretprobe_trampoline")
        for probe in (Kprobe(symbol_name="kretprobe_trampoline"), Kprobe(addr=tramp),
                      Kretprobe(handler=lambda ri, regs: None,
                                symbol_name="kretprobe_trampoline")):
            register = (m.kprobes.register_kretprobe if isinstance(probe, Kretprobe)
                        else m.kprobes.register_kprobe)
            with pytest.raises(KprobeError) as err:
                await register(probe)
            assert err.value.errno == errno.EINVAL
        rets = []
        rp = Kretprobe(handler=lambda ri, regs: rets.append(regs_return_value(regs)),
                       symbol_name="kprobe_target")
        await m.kprobes.register_kretprobe(rp)
        assert await m.call("kprobe_target", 30) == 10 and rets == [10]
        await m.kprobes.unregister_kretprobe(rp)
        assert m.kprobes.get_kprobe(tramp) is None


@pytest.mark.parametrize("first, then", [("0", "1"), ("1", "0")])
async def test_sysctl_flipped_with_instances_in_flight(first, then):
    """Instances taken with the trampoline trapping return through the trap-free one, and
    the other way round: each return handler runs once, the pool balances, no oops."""
    async with Machine(arch=ARCH, cpus=2, seed=5) as m:
        await m.sysctl.write("debug/kprobes-optimization", first)
        rets = []
        rp = Kretprobe(handler=lambda ri, regs: rets.append(regs_return_value(regs)),
                       maxactive=8, symbol_name="sleepy")
        await m.kprobes.register_kretprobe(rp)

        async def flip():
            await m.sleep_ns(200)
            assert rp.statistics().in_use > 0        # tasks asleep inside sleepy
            await m.sysctl.write("debug/kprobes-optimization", then)
        results = await concurrently(*(functools.partial(m.call, "sleepy", 5 + i)
                                       for i in range(6)), flip)
        s = rp.statistics()
        await m.kprobes.unregister_kretprobe(rp)
        assert results[:6] == [5, 6, 7, 8, 9, 10]
        assert sorted(rets) == [5, 6, 7, 8, 9, 10] and not m.oopses
        assert (s.free, s.in_use, s.taken, s.returned) == (8, 0, 6, 6)


async def test_a_trap_free_return_with_no_instance_is_one_kretprobe_bug(m):
    """With the trampoline trap-free, reaching it with no instance is still one "kretprobe
    BUG!" oops: its breakpoint never runs after the hook (no second report)."""
    assert m.sysctl.read("debug/kprobes-optimization") == "1\n"
    traps = m.statistics().traps
    with pytest.raises(Oops, match="kretprobe BUG!"):
        await m.call("kretprobe_trampoline")
    assert len(m.kprobes.simulation_errors) == 1 and len(m.oopses) == 1
    assert m.statistics().traps == traps


@pytest.mark.parametrize("optimized", [False, True], ids=["trap-based", "optimized"])
async def test_a_probe_hit_from_a_return_handler_is_missed_and_the_states_are_the_kernels(
        optimized):
    """While the return handlers run, the trampoline is the CPU's current kprobe, in
    HIT_ACTIVE: a probe hit from a handler is missed.  Trap-based, it is a reentry
    (REENTER, then back to HIT_ACTIVE); optimized, optimized_callback only counts the miss.
    The whole walk of the control block, entry and return, is the kernel's."""
    async with Machine(cpus=1, seed=1) as m:
        await m.sysctl.write("debug/kprobes-optimization", "1" if optimized else "0")
        got = []
        inner = Kprobe(symbol_name="kprobe_target2", pre_handler=lambda p, r: 0)
        rp = Kretprobe(symbol_name="kprobe_target",
                       handler=lambda ri, r: got.append(r.cpu.call("kprobe_target2", 6)))
        await m.kprobes.register_kprobe(inner)
        await m.kprobes.register_kretprobe(rp)
        await m.kprobes.optimizer.wait_for_kprobe_optimizer()
        kcb = m.kprobes.kprobe_ctlblk[0]
        kcb.transitions = []
        assert await m.call("kprobe_target", 9, cpu=0) == 3
        log, kcb.transitions = kcb.transitions, None
        assert (got, inner.nmissed) == ([3], 1)
        e, t = rp.kp.addr, m.kallsyms_lookup_name("kretprobe_trampoline")
        nested = [] if optimized else [(inner.addr, "REENTER"), (t, "HIT_ACTIVE")]
        assert log == [(e, "HIT_ACTIVE"), (0, "NONE"), (t, "HIT_ACTIVE"), *nested, (0, "NONE")]
        await m.kprobes.unregister_kprobe(inner)
        await m.kprobes.unregister_kretprobe(rp)

"""The conformance suite: the same kprobes behaviour on every architecture smpkprobes runs.

Everything here is written against the public API and the backend's declared facts (the
breakpoint bytes, the calling convention); nothing names an architecture.  Heavy parts run
at a small size; --stress-seeds deepens them.
"""


import pytest
import trio

from smpkprobes import cpus
from smpkprobes import (Jprobe, Kprobe, KprobeError, Kretprobe, Machine, jprobe_return,
                        regs_return_value)
from _probes import register_where_possible

ARCHES = cpus.available()


@pytest.fixture(params=ARCHES)
def arch(request):
    return request.param


@pytest.fixture(params=["1", "0"], ids=["optimized", "trap-based"])
def optimization(request):
    """debug/kprobes-optimization for the lib/test_kprobes.c ports: they pass either way."""
    return request.param


def _word(m, raw):
    return int.from_bytes(raw, m.backend.endian)


async def test_kernel_symbols(arch):
    """The default kernel's symbols behave as API.md's table says."""
    async with Machine(arch=arch, cpus=2, seed=1) as m:
        a = await m.call("do_fork", 0x11, 0, 0, 0, 0, 0)
        assert await m.call("do_fork", 0x11, 0, 0, 0, 0, 0) == a + 1
        assert await m.call("fork_loop", 5) == 5
        assert await m.call("sys_open", 0, 0, 0) == -2
        assert await m.call("open_loop", 9, 3) == 3
        assert await m.call("vfs_read", 0, 0, 77, 0) == 77
        assert await m.call("tcp_v4_rcv", 0) == 0
        assert await m.call("kprobe_target", 31) == 10
        assert await m.call("kprobe_target2", 31) == 11
        assert await m.call("kprobe_recursed_target") != 0
        assert await m.call("fib", 12) == 144
        assert await m.call("sleepy", 2) == 2
        assert await m.call("exit_inside", -3) == -3
        assert await m.call("bench_loop", 10) == 100
        assert await m.call("jprobe_stackargs_caller", 1) == sum(k * k for k in range(1, 11))
        assert m.symbolize(await m.call("stacktrace_driver"))[0] == "__hc_task_return"
        mod = await m.load_module("example_mod")
        assert await m.call("example_mod_func", 41) == 42
        await m.unload_module(mod)


async def test_kprobe_handlers_and_missed(arch, optimization):
    """test_kprobe, test_kprobes and test_kprobe_missed, ported."""
    async with Machine(arch=arch, cpus=2, seed=1) as m:
        await m.sysctl.write("debug/kprobes-optimization", optimization)
        seen = []
        kps = [Kprobe(symbol_name=s, pre_handler=lambda p, r: seen.append((p.symbol_name, r.arg(0))),
                      post_handler=lambda p, r, f: seen.append(f))
               for s in ("kprobe_target", "kprobe_target2")]
        await m.kprobes.register_kprobes(kps)
        assert await m.call("kprobe_target", 600) == 200
        assert await m.call("kprobe_target2", 600) == 201
        await m.kprobes.unregister_kprobes(kps)
        assert seen == [("kprobe_target", 600), 0, ("kprobe_target2", 600), 0]
        kp = Kprobe(symbol_name="kprobe_recursed_target",
                    pre_handler=lambda p, r: r.cpu.call("kprobe_recursed_target") and 0,
                    post_handler=lambda p, r, f: r.cpu.call("kprobe_recursed_target"))
        await m.kprobes.register_kprobe(kp)
        await m.call("kprobe_recursed_target")
        await m.kprobes.unregister_kprobe(kp)
        assert kp.nmissed == 2


TRANSPARENCY = {
    "kprobe_target": [(7,), (0xFFFFFFFF,)],
    "kprobe_target2": [(100,)],
    "sys_open": [(0, 0, 0)],
    "bench_loop": [(4,)],
    "fib": [(7,)],
    "do_sys_open": [(-100, 0, 0, 0)],
    "open_loop": [(6, 2)],
    "fork_loop": [(3,)],
    "jprobe_stackargs_caller": [(5,)],
    "stacktrace_internal_target": [()],
}


async def test_transparency_on_every_instruction(arch):
    """A kprobe on each instruction boundary, with and without a post_handler, leaves the
    results unchanged; refused instructions carry EOPNOTSUPP or EINVAL and a reason."""
    async with Machine(arch=arch, cpus=2, seed=2) as m:
        expected = {f: [await m.call(f, *a) for a in args] for f, args in TRANSPARENCY.items()}
        probed = 0
        for func, args in TRANSPARENCY.items():
            sym = m.kallsyms.lookup(func)
            for addr in sorted(m.kprobes._insn_boundaries(sym)):
                for post in (None, lambda p, r, f: None):
                    hits = []
                    kp = Kprobe(addr=addr, pre_handler=lambda p, r: hits.append(1),
                                post_handler=post)
                    try:
                        await m.kprobes.register_kprobe(kp)
                    except KprobeError as e:
                        assert e.errno in (95, 22), e
                        continue
                    got = [await m.call(func, *a) for a in args]
                    await m.kprobes.unregister_kprobe(kp)
                    assert got == expected[func], (func, m.format_addr(addr), post is not None)
                    probed += 1
            assert m.read_memory(sym.addr, sym.size) == m.kprobes.original_text(sym.addr, sym.size)
        assert probed > 50 and m.oopses == []


async def test_smp_accounting_and_batch_unregister(arch, stress_seeds):
    """4 CPUs on probed functions: hits are exact; a batch unregister while firing takes one
    grace period, restores the text and runs no handler afterwards."""
    for seed in range(stress_seeds):
        async with Machine(arch=arch, cpus=4, seed=seed) as m:
            spots = sorted(m.kprobes._insn_boundaries(m.kallsyms.lookup("do_fork")))
            original = m.read_memory(spots[0], spots[-1] + 4 - spots[0])
            after = [False]
            late, hits = [], []

            def pre(p, r):
                (late if after[0] else hits).append(p.addr)
            probes = await register_where_possible(m, spots, pre_handler=pre)
            results = {}

            async def worker(c):
                results[c] = await m.call("fork_loop", 200, cpu=c)
            async with trio.open_nursery() as n:
                for c in (1, 2, 3):
                    n.start_soon(worker, c)
                await m.call("fib", 9, cpu=0)
                gp = m.statistics().grace_periods
                await m.kprobes.unregister_kprobes(probes)
                assert m.statistics().grace_periods == gp + 1
                after[0] = True
            assert late == [] and m.oopses == [] and results == {1: 200, 2: 200, 3: 200}
            assert m.read_memory(spots[0], len(original)) == original


async def test_kretprobe_and_stacktrace(arch, optimization):
    """test_kretprobe and test_stacktrace_on_nested_kretprobe: the return value, the entry
    handler, and real return addresses in stack traces."""
    async with Machine(arch=arch, cpus=2, seed=3) as m:
        await m.sysctl.write("debug/kprobes-optimization", optimization)
        got = []
        rp = Kretprobe(handler=lambda ri, r: got.append(regs_return_value(r)),
                       entry_handler=lambda ri, r: got.append("entry") and 0,
                       symbol_name="kprobe_target")
        await m.kprobes.register_kretprobe(rp)
        assert await m.call("kprobe_target", 99) == 33
        await m.kprobes.unregister_kretprobe(rp)
        assert got == ["entry", 33]
        await m.call("stacktrace_driver")
        arr = m.kallsyms_lookup_name("target_return_address")
        w = m.backend.word_bytes
        inner, outer = (_word(m, m.read_memory(arr + i * w, w)) for i in (0, 1))
        traces = []
        rps = [Kretprobe(handler=lambda ri, r: traces.append((r.ip, r.stack_trace())),
                         symbol_name=s) for s in ("stacktrace_target", "stacktrace_internal_target")]
        await m.kprobes.register_kretprobes(rps)
        await m.call("stacktrace_driver")
        await m.kprobes.unregister_kretprobes(rps)
        (ip0, t0), (ip1, t1) = traces
        tramp = m.kallsyms_lookup_name("kretprobe_trampoline")
        assert ip0 == inner and t0[:2] == [inner, outer] and tramp not in t0
        assert ip1 == outer and t1[0] == outer and tramp not in t1


async def test_jprobes(arch):
    """A Python jprobe sees the mirrored arguments; a guest jprobe runs and returns through
    jprobe_return; scribbled stack arguments do not reach the probed function."""
    async with Machine(arch=arch, cpus=2, seed=4) as m:
        seen = []

        def j_target(value):
            seen.append(value)
            jprobe_return()
        jp = Jprobe(j_target, symbol_name="kprobe_target")
        await m.kprobes.register_jprobe(jp)
        assert await m.call("kprobe_target", 300) == 100
        await m.kprobes.unregister_jprobe(jp)
        assert seen == [300]
        jp = Jprobe("jdo_fork", symbol_name="do_fork")
        await m.kprobes.register_jprobe(jp)
        await m.call("fork_loop", 2)
        await m.kprobes.unregister_jprobe(jp)
        assert m.printk_log.count("jprobe: clone_flags = 0x11, stack_start = 0x0 "
                                  "regs = 0x" + "0" * (m.backend.bits // 4)) == 2
        plain = await m.call("jprobe_stackargs_caller", 3)
        jp = Jprobe("jprobe_scribble_handler", symbol_name="jprobe_stackargs_target")
        await m.kprobes.register_jprobe(jp)
        assert await m.call("jprobe_stackargs_caller", 3) == plain
        await m.kprobes.unregister_jprobe(jp)
        assert m.oopses == []

"""The default kernel: every symbol of API.md's table behaves as its row says."""

import trio
import pytest

from smpkprobes import Machine
from smpkprobes.machine import _memory as mem

SCRATCH = mem.DATA.start + 0x8_0000


@pytest.fixture
async def m():
    async with Machine(cpus=2, seed=3) as machine:
        yield machine


async def test_do_fork_counts_atomically(m):
    """do_fork returns consecutive pids from one global counter."""
    a = await m.call("do_fork", 0x11, 0, 0, 0, 0, 0)
    b = await m.call("do_fork", 0x11, 0, 0, 0, 0, 0)
    assert b == a + 1


async def test_fork_loop_concurrent_pids_are_all_distinct(m):
    """fork_loop(n) returns n, and concurrent loops allocate every pid exactly once."""
    before = await m.call("do_fork", 0, 0, 0, 0, 0, 0)
    async with trio.open_nursery() as n:
        for c in range(2):
            n.start_soon(lambda c=c: m.call("fork_loop", 300, cpu=c))
    after = await m.call("do_fork", 0, 0, 0, 0, 0, 0)
    assert after - before == 601
    assert await m.call("fork_loop", 7) == 7


async def test_open_family(m):
    """do_sys_open/sys_open fail with -ENOENT on NULL or "", else give fds >= 3;
    open_loop counts its failures."""
    m.write_memory(SCRATCH, b"\0")
    m.write_memory(SCRATCH + 8, b"/etc/passwd\0")
    assert await m.call("do_sys_open", -100, 0, 0, 0) == -2
    assert await m.call("do_sys_open", -100, SCRATCH, 0, 0) == -2
    assert await m.call("do_sys_open", -100, SCRATCH + 8, 0, 0) >= 3
    assert await m.call("sys_open", 0, 0, 0) == -2
    assert await m.call("sys_open", SCRATCH + 8, 0, 0) >= 3
    assert await m.call("open_loop", 10, 3) == 3
    assert await m.call("open_loop", 10, 0) == 0


async def test_simple_symbols(m):
    """vfs_read, tcp_v4_rcv, kprobe_target(2), kprobe_recursed_target, fib, bench_*."""
    assert await m.call("vfs_read", 0, 0, 77, 0) == 77
    assert await m.call("tcp_v4_rcv", 0) == 0
    assert await m.call("kprobe_target", 31) == 10
    assert await m.call("kprobe_target2", 31) == 11
    assert await m.call("kprobe_recursed_target") != 0
    assert await m.call("fib", 15) == 610
    assert await m.call("bench_target", 5) == 11
    assert await m.call("bench_loop", 10) == sum(2 * i + 1 for i in range(10))
    for name in ("do_page_fault", "notifier_call_chain", "__switch_to"):
        assert await m.call(name, 0, 0, 0) in (0,)


async def test_stacktrace_symbols(m):
    """stacktrace_driver/target/internal_target store and return the return addresses."""
    ret = await m.call("stacktrace_driver")
    assert ret == m.kallsyms_lookup_name("__hc_task_return")
    arr = m.kallsyms_lookup_name("target_return_address")
    raw = m.read_memory(arr, 16)
    inner, outer = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
    assert m.symbolize(outer)[0] == "stacktrace_driver"
    assert m.symbolize(inner)[0] == "stacktrace_target"


async def test_sleepy_advances_virtual_time_and_exit_inside(m):
    """sleepy(ms) returns ms after ms of virtual time; exit_inside(code) returns code via
    do_exit; schedule() returns."""
    t0 = max(c.clock for c in m.cpus)
    assert await m.call("sleepy", 3, cpu=0) == 3
    assert m.cpus[0].clock - t0 >= 3_000_000
    assert await m.call("exit_inside", 7) == 7
    assert await m.call("exit_inside", -5) == -5
    await m.call("schedule")


async def test_locked_inc_is_mutually_exclusive():
    """locked_inc under the guest spinlock loses no increment with 4 CPUs at fine quanta."""
    async with Machine(cpus=4, seed=5, quantum=(3, 60)) as m:
        lock, counter = SCRATCH, SCRATCH + 64
        m.write_memory(lock, bytes(8))
        m.write_memory(counter, bytes(8))
        async with trio.open_nursery() as n:
            for c in range(4):
                n.start_soon(lambda c=c: m.call("locked_inc", lock, counter, 200, cpu=c))
        assert int.from_bytes(m.read_memory(counter, 8), "little") == 800


async def test_kprobes_text_holds_the_trampolines(m):
    """jprobe_return and kretprobe_trampoline lie in the kprobes text region."""
    lo, hi = m.kprobes_text
    for name in ("jprobe_return", "kretprobe_trampoline"):
        assert lo <= m.kallsyms_lookup_name(name) < hi


async def test_example_module(m):
    """example_mod loads, runs its init (printk), frees its init text, and unloads."""
    mod = await m.load_module("example_mod")
    assert "example_mod: init" in m.printk_log
    assert mod.init_freed
    addr = m.kallsyms_lookup_name("example_mod_func")
    assert m.symbolize(addr) == ("example_mod_func", 0, "example_mod")
    assert await m.call("example_mod_func", 41) == 42
    await m.unload_module(mod)
    assert m.kallsyms_lookup_name("example_mod_func") == 0


@pytest.mark.parametrize("arch", sorted(__import__("smpkprobes.machine.kernel.build", fromlist=["ARCHES"]).ARCHES))
def test_committed_images_match_sources(arch):
    """The committed kernel images were built from the committed sources; with clang
    present, rebuilding gives the same bytes."""
    import json
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path
    from smpkprobes.machine.kernel import build
    images = Path(build.__file__).parent / "images" / arch
    manifest = json.loads((images / "manifest.json").read_text())
    assert manifest["sources_sha256"] == build.sources_digest(arch)
    if shutil.which("clang") is None or shutil.which("ld.lld") is None:
        pytest.skip("clang/ld.lld not installed: checked the source digest only")
    version = subprocess.run(["clang", "--version"], capture_output=True, text=True).stdout
    if version.splitlines()[0] != manifest["clang"]:
        pytest.skip(f"different clang ({version.splitlines()[0]}): checked the digest only")
    with tempfile.TemporaryDirectory() as out:
        build.build(arch, Path(out))
        for name in ("vmlinux", "example_mod.ko"):
            assert (Path(out) / name).read_bytes() == (images / name).read_bytes()

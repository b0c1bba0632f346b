"""jprobes on x86_64: the old lib/test_kprobes.c test_jprobe, guest and Python entries, the
mirror principle, EEXIST, jprobes beside other probes, misbehaving handlers; and the three
samples/kprobes scenarios run as scripts."""

import errno
import functools
import importlib.util
import sys
from pathlib import Path

import capstone
import pytest
import trio

from smpkprobes import (Jprobe, Kprobe, KprobeError, Kretprobe, Machine, Oops, jprobe_return,
                        regs_return_value)
from smpkprobes.scenario import Report
from smpkprobes.scenario import parser as scenario_parser

ARCH = "x86_64"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def m():
    async with Machine(arch=ARCH, cpus=4, seed=1) as machine:
        yield machine


def stackargs_expected(base: int) -> int:
    """jprobe_stackargs_caller(base): the weighted sum of its ten arguments base..base+9."""
    return sum(k * (base + k - 1) for k in range(1, 11))


# -- the old lib/test_kprobes.c ---------------------------------------------------------
async def test_jprobe(m):
    """test_jprobe: the entry gets the argument; the probed function returns as before."""
    seen = []

    def j_kprobe_target(value):
        seen.append(value)
        jprobe_return()
    jp = Jprobe(j_kprobe_target, symbol_name="kprobe_target")
    await m.kprobes.register_jprobe(jp)
    assert await m.call("kprobe_target", 0x1234) == 0x1234 // 3
    await m.kprobes.unregister_jprobe(jp)
    assert await m.call("kprobe_target", 6) == 2
    assert seen == [0x1234] and jp.nmissed == 0


async def test_jprobes_batch_of_two(m):
    """test_jprobes: a batch of two jprobes each get their function's argument."""
    seen = []

    def entry_for(name):
        def entry(value):
            seen.append((name, value))
            jprobe_return()
        return entry
    jps = [Jprobe(entry_for(s), symbol_name=s) for s in ("kprobe_target", "kprobe_target2")]
    await m.kprobes.register_jprobes(jps)
    assert await m.call("kprobe_target", 30) == 10
    assert await m.call("kprobe_target2", 33) == 12
    await m.kprobes.unregister_jprobes(jps)
    assert seen == [("kprobe_target", 30), ("kprobe_target2", 33)]
    assert [jp.kp.registered for jp in jps] == [False, False]


# -- guest entries ------------------------------------------------------------------------
async def test_guest_entry_jdo_fork_prints_the_arguments(m):
    """A guest entry (jdo_fork) on do_fork printks its arguments; do_fork still forks."""
    before = await m.call("do_fork", 0x11, 0, 0, 0, 0, 0)
    jp = Jprobe("jdo_fork", symbol_name="do_fork")
    await m.kprobes.register_jprobe(jp)
    pid = await m.call("do_fork", 0x1200011, 0x7ffd1000, 0xffff8800deadbeef, 0, 0, 0)
    await m.kprobes.unregister_jprobe(jp)
    assert pid == before + 1
    assert m.printk_log == ["jprobe: clone_flags = 0x1200011, stack_start = 0x7ffd1000 "
                            "regs = 0xffff8800deadbeef"]


async def test_guest_entry_on_every_cpu(m):
    """fork_loop on 4 CPUs under a guest-entry jprobe: one printk per call, pids unique."""
    jp = Jprobe("jdo_fork", symbol_name="do_fork")
    await m.kprobes.register_jprobe(jp)
    first = await m.call("do_fork", 0, 0, 0, 0, 0, 0)
    async with trio.open_nursery() as n:
        for c in range(4):
            n.start_soon(functools.partial(m.call, "fork_loop", 25, cpu=c))
    last = await m.call("do_fork", 0, 0, 0, 0, 0, 0)
    await m.kprobes.unregister_jprobe(jp)
    assert last == first + 101         # every do_fork ran exactly once, atomically
    line = "jprobe: clone_flags = 0x11, stack_start = 0x0 regs = 0x0000000000000000"
    zero = "jprobe: clone_flags = 0x0, stack_start = 0x0 regs = 0x0000000000000000"
    assert m.printk_log == [zero] + [line] * 100 + [zero]
    assert m.oopses == [] and m.kprobes.statistics().hits == 102


async def test_mirror_principle_scribbling_guest_entry(m):
    """A guest entry that scribbles over its stack arguments and argument registers changes
    nothing the probed function sees."""
    unprobed = await m.call("jprobe_stackargs_caller", 1)
    assert unprobed == stackargs_expected(1)
    jp = Jprobe("jprobe_scribble_handler", symbol_name="jprobe_stackargs_target")
    await m.kprobes.register_jprobe(jp)
    probed = [await m.call("jprobe_stackargs_caller", base) for base in (1, 100)]
    await m.kprobes.unregister_jprobe(jp)
    assert probed == [unprobed, stackargs_expected(100)]
    assert m.kprobes.statistics().hits == 2 and m.oopses == []


async def test_mirror_principle_python_entry_sees_stack_arguments(m):
    """A Python entry mirroring a ten-argument function gets all ten, stack ones included."""
    seen = []

    def entry(a, b, c, d, e, f, g, h, i, j):
        seen.append((a, b, c, d, e, f, g, h, i, j))
        jprobe_return()
    jp = Jprobe(entry, symbol_name="jprobe_stackargs_target")
    await m.kprobes.register_jprobe(jp)
    assert await m.call("jprobe_stackargs_caller", 5) == stackargs_expected(5)
    await m.kprobes.unregister_jprobe(jp)
    assert seen == [tuple(range(5, 15))]


# -- registration -----------------------------------------------------------------------
async def test_a_jprobe_saves_and_restores_no_byte_past_its_task_stack(m):
    """setjmp_pre_handler saves MIN_STACK_SIZE: MAX_STACK_SIZE bytes from SP, but never past
    the top of the task's stack, since what lies beyond is another task's stack.  Called
    straight from the host, kprobe_target's SP is a word or two below the top; a write just
    above the top while the entry runs (as another CPU's task could make) must survive the
    jprobe's restore of the stack."""
    above = []

    def entry(value):
        top = m.cpus[0].current.stack_top
        m.write_memory(top, b"\x5a" * 8)
        above.append(top)
        jprobe_return()
    jp = Jprobe(entry, symbol_name="kprobe_target")
    await m.kprobes.register_jprobe(jp)
    assert await m.call("kprobe_target", 30, cpu=0) == 10
    await m.kprobes.unregister_jprobe(jp)
    (top,) = above
    assert m.read_memory(top, 8) == b"\x5a" * 8


async def test_second_jprobe_at_one_address_is_eexist(m):
    """One jprobe per address: the second is EEXIST, the first keeps working."""
    seen = []

    def first(v):
        seen.append(("first", v))
        jprobe_return()
    jp1 = Jprobe(first, symbol_name="kprobe_target")
    jp2 = Jprobe("jdo_fork", addr=m.kallsyms_lookup_name("kprobe_target"))
    await m.kprobes.register_jprobe(jp1)
    with pytest.raises(KprobeError, match="EEXIST") as err:
        await m.kprobes.register_jprobe(jp2)
    assert err.value.errno == errno.EEXIST and not jp2.kp.registered
    assert await m.call("kprobe_target", 9) == 3
    await m.kprobes.unregister_jprobe(jp1)
    await m.kprobes.register_jprobe(jp2)      # the address is free again
    await m.kprobes.unregister_jprobe(jp2)
    assert seen == [("first", 9)] and m.printk_log == []


async def test_jprobe_must_be_at_function_entry(m):
    """A jprobe at offset != 0 is EINVAL."""
    addr = m.kallsyms_lookup_name("kprobe_target")
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    jp = Jprobe(lambda v: jprobe_return(), symbol_name="kprobe_target")
    jp.kp.offset = next(md.disasm(m.read_memory(addr, 16), addr, 1)).size   # 2nd insn
    with pytest.raises(KprobeError, match="function entry") as err:
        await m.kprobes.register_jprobe(jp)
    assert err.value.errno == errno.EINVAL and m.kprobes.probes() == []


# -- beside other probes --------------------------------------------------------------------
async def register_in_order(m, order, jp, other):
    for kind in order:
        if kind == "j":
            await m.kprobes.register_jprobe(jp)
        elif isinstance(other, Kretprobe):
            await m.kprobes.register_kretprobe(other)
        else:
            await m.kprobes.register_kprobe(other)


@pytest.mark.parametrize("order", ["jr", "rj"])
async def test_jprobe_and_kretprobe_on_one_function(m, order):
    """A guest-entry jprobe and a kretprobe on do_fork, registered in either order: both
    fire, in order, on every call."""
    rets = []
    jp = Jprobe("jdo_fork", symbol_name="do_fork")
    rp = Kretprobe(handler=lambda ri, regs: rets.append(regs_return_value(regs)),
                   entry_handler=lambda ri, regs: rets.append(("entry", regs.arg(0))),
                   symbol_name="do_fork")
    await register_in_order(m, order, jp, rp)
    pids = [await m.call("do_fork", flags, 0, 0, 0, 0, 0) for flags in (1, 2)]
    await m.kprobes.unregister_jprobe(jp)
    await m.kprobes.unregister_kretprobe(rp)
    assert pids[1] == pids[0] + 1
    assert rets == [("entry", 1), pids[0], ("entry", 2), pids[1]]
    assert m.printk_log == [f"jprobe: clone_flags = 0x{f}, stack_start = 0x0 "
                            f"regs = 0x0000000000000000" for f in (1, 2)]


async def test_python_jprobe_and_kretprobe_registered_in_either_order(m):
    """Whichever is registered first, the jprobe entry and the return handler both run."""
    for order in ("jr", "rj"):
        seen = []

        def entry(v):
            seen.append(("j", v))
            jprobe_return()
        jp = Jprobe(entry, symbol_name="kprobe_target")
        rp = Kretprobe(handler=lambda ri, regs: seen.append(("r", regs_return_value(regs))),
                       symbol_name="kprobe_target")
        await register_in_order(m, order, jp, rp)
        assert await m.call("kprobe_target", 21) == 7
        await m.kprobes.unregister_jprobe(jp)
        await m.kprobes.unregister_kretprobe(rp)
        assert seen == [("j", 21), ("r", 7)], order


@pytest.mark.parametrize("order", ["jk", "kj"])
async def test_kprobe_handlers_wrap_a_guest_jprobe_entry(m, order):
    """A kprobe at a jprobe's address, registered before or after it: pre_handler before the
    entry, post_handler after jprobe_return, then the function runs normally."""
    seen = []
    kp = Kprobe(symbol_name="do_fork",
                pre_handler=lambda p, regs: seen.append(("pre", len(m.printk_log))),
                post_handler=lambda p, regs, flags: seen.append(("post", len(m.printk_log))))
    jp = Jprobe("jdo_fork", symbol_name="do_fork")
    await register_in_order(m, order, jp, kp)
    before = await m.call("do_fork", 0, 0, 0, 0, 0, 0)
    assert await m.call("do_fork", 0x11, 0, 0, 0, 0, 0) == before + 1
    await m.kprobes.unregister_kprobe(kp)
    await m.kprobes.unregister_jprobe(jp)
    assert seen == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2)]


# -- a misbehaving handler ------------------------------------------------------------------
async def test_python_entry_without_jprobe_return_oopses_cleanly(m):
    """A Python entry that returns without jprobe_return(): that task oopses with a clear
    cause, other CPUs' work is untouched, and the machine stays usable."""
    def forgetful(value):
        return value

    jp = Jprobe(forgetful, symbol_name="kprobe_target")
    await m.kprobes.register_jprobe(jp)
    results = {}

    async def victim():
        with pytest.raises(Oops, match="returned without calling jprobe_return") as err:
            await m.call("kprobe_target", 3, cpu=0)
        results["oops"] = err.value.record

    async def bystander():
        results["fork"] = await m.call("fork_loop", 200, cpu=1)
    async with trio.open_nursery() as n:
        n.start_soon(victim)
        n.start_soon(bystander)
    record = results["oops"]
    assert record.cause == ("exception in a handler of <Jprobe kprobe_target> at "
                            "kprobe_target+0x0: RuntimeError: jprobe handler "
                            "test_python_entry_without_jprobe_return_oopses_cleanly.<locals>."
                            "forgetful returned without calling jprobe_return()")
    assert (record.cpu, record.comm) == (0, "kprobe_target")
    assert results["fork"] == 200 and m.oopses == [record] and jp.nmissed == 1
    await m.kprobes.unregister_jprobe(jp)
    assert await m.call("kprobe_target", 3, cpu=0) == 1
    assert all(not m.kprobes.kprobe_ctlblk[c.id].current_kprobe and c.preempt_count == 0
               for c in m.cpus)


# -- the samples/kprobes scenarios ------------------------------------------------------------
SCENARIOS = {
    "kprobe_example": ([], [
        "Planted kprobe at {do_fork:016x}",
        "pre_handler: p->addr = 0x{do_fork:016x}, ip = {do_fork:x}, flags = 0x",
        "post_handler: p->addr = 0x{do_fork:016x}, flags = 0x",
        "kprobe at {do_fork:016x} unregistered",
        "summary: 4 calls of do_fork on 2 CPUs, 4 pre_handler and 4 post_handler runs, "
        "per CPU {{0: 2, 1: 2}}, nmissed 0",
    ]),
    "jprobe_example": (["--preempt"], [
        "Planted jprobe at {do_fork:016x}, handler addr {jdo_fork:016x}",
        "jprobe: clone_flags = 0x11, stack_start = 0x0 regs = 0x0000000000000000",
        "jprobe at {do_fork:016x} unregistered",
        "summary: 4 calls of do_fork from fork_loop on 2 CPUs, 4 jprobe lines, "
        "last_pid 100 -> 104, nmissed 0",
    ]),
    "kretprobe_example": (["--func", "do_sys_open", "--preempt"], [
        "Planted return probe at do_sys_open: {do_sys_open:016x}",
        "do_sys_open returned -2 and took ",
        "do_sys_open returned 3 and took ",
        "kretprobe at {do_sys_open:016x} unregistered",
        "Missed probing 0 instances of do_sys_open",
        "summary: 4 calls of do_sys_open from open_loop on 2 CPUs, 4 returns handled, "
        "0 missed, maxactive 20",
    ]),
}


def load_scenario(name: str):
    spec = importlib.util.spec_from_file_location(f"scenario_{name}",
                                                  ROOT / "scenarios" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_scenario_script(name):
    """Each samples/kprobes scenario runs as a script, exits 0 and prints its key lines."""
    args, wanted = SCENARIOS[name]
    async with Machine(arch=ARCH, cpus=1) as m:
        addrs = {s: m.kallsyms_lookup_name(s) for s in ("do_fork", "do_sys_open", "jdo_fork")}
    proc = await trio.run_process(
        [sys.executable, str(ROOT / "scenarios" / f"{name}.py"), "--cpus", "2", "--seed", "4",
         "--size", "2", *args], capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    lines = out.splitlines()
    for want in wanted:
        want = want.format(**addrs)
        assert any(line.startswith(want) for line in lines), (want, out)
    assert lines[-1].startswith("PASS: ")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_scenario_fails_when_its_probes_never_fire(name):
    """A scenario's expectations fail when its probe never fires (kprobes disabled through
    debugfs): the checks are real."""
    scenario = load_scenario(name)
    args = scenario_parser().parse_args(["--size", "2"])
    report = Report()
    async with Machine(arch=ARCH, cpus=2, seed=1) as m:
        await m.debugfs.write("kprobes/enabled", "0")
        await scenario.scenario(m, report, args)
    assert not report.ok and report.failures
    assert any(line.startswith("EXPECTATION FAILED: ") for line in report.lines)

"""The code hooks' dispatch (smpkprobes/machine/_codehook.py): the C extension and its
ctypes twin keep one protocol - callback(addr) before each instruction of the range, its
truthy result ends the quantum at once, an exception goes to the machine's hook-error path
(an oops for the task, the CPU runs on) - and give the same runs, event for event."""

import pytest
import trio

from smpkprobes import Kprobe, Kretprobe, Machine
from smpkprobes.machine import _codehook
from test_blockbudget import _can_build_extensions

ROUTES = ["c", "python"]


@pytest.fixture(params=ROUTES)
def route(request, monkeypatch):
    monkeypatch.delenv("SMPKPROBES_CODE_HOOK", raising=False)
    if request.param == "c" and _codehook.hook_route() != "c":
        pytest.skip("the C dispatch was not built here")
    if request.param == "python":
        monkeypatch.setenv("SMPKPROBES_CODE_HOOK", "python")
    assert _codehook.hook_route() == request.param
    return request.param


def test_the_c_dispatch_is_built_where_it_can_be_and_the_switch_forces_the_twin(
        monkeypatch):
    monkeypatch.delenv("SMPKPROBES_CODE_HOOK", raising=False)
    if _can_build_extensions():
        assert _codehook._codehook_native is not None
        assert _codehook.hook_route() == "c"
    monkeypatch.setenv("SMPKPROBES_CODE_HOOK", "python")
    assert _codehook.hook_route() == "python"


async def test_the_callback_sees_each_instruction_of_its_range_once(route):
    """A hook on fib's first instruction: one call per fib call, with that address, and the
    guest's result is unchanged."""
    async with Machine(cpus=1, seed=1) as m:
        fib = m.kallsyms.lookup("fib").addr
        seen = []

        def cb(addr):
            seen.append(addr)
            return False
        m.cpus[0].add_code_hook(fib, fib + 1, cb)
        assert await m.call("fib", 10, cpu=0) == 55
        assert seen == [fib] * 177              # fib(10) makes 177 calls of fib


async def test_a_true_result_ends_the_quantum_there(route):
    """callback -> True stops the emulator before the hooked instruction: the quantum ends
    early, and the run goes on from there to the same result."""
    async with Machine(cpus=1, seed=1) as m:
        fib = m.kallsyms.lookup("fib").addr
        cpu = m.cpus[0]
        q0 = cpu.quanta
        await m.call("fib", 12, cpu=0)
        plain = cpu.quanta - q0
        stops = []

        def cb(addr):
            if len(stops) < 20:
                stops.append(addr)
                cpu.stop_requested = True
                return True
            return False
        cpu.add_code_hook(fib, fib + 1, cb)
        q0 = cpu.quanta
        assert await m.call("fib", 12, cpu=0) == 144
        assert len(stops) == 20
        assert cpu.quanta - q0 >= plain + 20


async def test_an_exception_in_the_callback_is_an_oops_and_the_machine_runs_on(route):
    """A callback that raises: the task calling it oopses (internal error in a CPU
    callback, named), nothing leaks out of Unicorn, and later calls run."""
    async with Machine(cpus=2, seed=1) as m:
        fib = m.kallsyms.lookup("fib").addr
        armed = [True]

        def cb(addr):
            if armed[0]:
                armed[0] = False
                raise ZeroDivisionError("boom")
            return False
        m.cpus[0].add_code_hook(fib, fib + 1, cb)
        with pytest.raises(Exception) as err:
            await m.call("fib", 5, cpu=0)
        assert "ZeroDivisionError: boom" in str(err.value)
        assert await m.call("fib", 5, cpu=0) == 5
        assert await m.call("fib", 6, cpu=1) == 8


async def test_a_keyboard_interrupt_in_the_callback_reaches_the_caller(route):
    """KeyboardInterrupt is not an oops: it leaves the machine (alone, or in the nursery's
    group), once Unicorn returned."""
    oopses = None
    with pytest.raises(BaseException) as caught:     # noqa: PT011 - checked below
        async with Machine(cpus=1, seed=1) as m:
            oopses = m.oopses
            fib = m.kallsyms.lookup("fib").addr

            def cb(addr):
                raise KeyboardInterrupt
            m.cpus[0].add_code_hook(fib, fib + 1, cb)
            await m.call("fib", 5, cpu=0)
    exc = caught.value
    if isinstance(exc, BaseExceptionGroup):
        exc, rest = exc.split(KeyboardInterrupt)
        assert exc is not None and rest is None, caught.value
    else:
        assert isinstance(exc, KeyboardInterrupt), exc
    assert oopses == []


async def _optimized_run(seed):
    async with Machine(cpus=4, seed=seed, preempt=True) as m:
        kp = Kprobe(symbol_name="do_fork", pre_handler=lambda p, r: 0)
        rp = Kretprobe(symbol_name="fib", handler=lambda ri, r: 0, maxactive=3)
        await m.kprobes.register_kprobe(kp)
        await m.kprobes.register_kretprobe(rp)
        await m.kprobes.optimizer.wait_for_kprobe_optimizer()
        results = {}

        async def one(func, arg, cpu):
            results[(func, cpu)] = await m.call(func, arg, cpu=cpu)
        async with trio.open_nursery() as n:
            for c in range(4):
                n.start_soon(one, "fork_loop", 30, c)
                n.start_soon(one, "fib", 9, c)
        st = m.kprobes.optimizer.statistics()
        await m.kprobes.unregister_kprobe(kp)
        await m.kprobes.unregister_kretprobe(rp)
        return m.trace_digest(), results, m.statistics(), st, kp.nmissed, rp.nmissed


@pytest.mark.parametrize("seed", [1, 2])
async def test_c_and_python_dispatch_give_the_same_optimized_run(seed, monkeypatch):
    """Jump-optimized kprobe and trap-free kretprobe returns on a preemptive 4-CPU run:
    the same trace digest, results, statistics and miss counts through either dispatch."""
    monkeypatch.delenv("SMPKPROBES_CODE_HOOK", raising=False)
    if _codehook.hook_route() != "c":
        pytest.skip("the C dispatch was not built here")
    native = await _optimized_run(seed)
    monkeypatch.setenv("SMPKPROBES_CODE_HOOK", "python")
    python = await _optimized_run(seed)
    assert native[3].optimized == 2              # do_fork and fib
    assert native == python

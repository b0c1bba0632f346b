"""Reliability, part 1: the kprobes API as an adversarial user calls it.

Each test is one bullet of the reliability issue (issue 12): it makes the attack, asserts
the behaviour KPROBES.md asks for (refused before anything changes, all-or-nothing, one
form for errors), then runs the health check of `_health.py`.
"""

import errno
import functools

import pytest
import trio

from _health import healthy, text_is_pristine
from smpkprobes import Jprobe, Kprobe, KprobeError, Kretprobe, Machine, Oops, jprobe_return

FIXED = "fixed by the reliability branch"


@pytest.fixture
async def m():
    async with Machine(cpus=4, seed=3) as machine:
        yield machine


def _pre(hits):
    return lambda p, regs: hits.append(p.symbol_name)


async def _busy(m, nursery, calls=200_000):
    """Keep every CPU but CPU 0 running fork_loop, so that text pokes and grace periods wait
    on them.
    Returns the cancel scope that stops them."""
    scope = trio.CancelScope()

    async def loops():
        with scope:
            async with trio.open_nursery() as n:
                for cpu in range(1, m.ncpus):
                    n.start_soon(functools.partial(m.call, "fork_loop", calls, cpu=cpu))
    nursery.start_soon(loops)
    # A call on CPU 0 returns once the loops run on the others.
    assert await m.call("fib", 12, cpu=0) == 144
    return scope


# == item 1: all-or-nothing =========================================================
@pytest.mark.parametrize("bad", [None, "kretprobe", 42])
async def test_a_bad_entry_in_an_unregister_batch_changes_nothing(m, bad):
    """unregister_kprobes([kp, BAD, kp2]) is a TypeError raised before any probe is touched:
    both probes stay registered and firing, and no breakpoint is orphaned."""
    hits = []
    kp, kp2 = (Kprobe(symbol_name=s, pre_handler=_pre(hits))
               for s in ("kprobe_target", "kprobe_target2"))
    await m.kprobes.register_kprobes([kp, kp2])
    if bad == "kretprobe":
        bad = Kretprobe(symbol_name="do_fork")
        await m.kprobes.register_kretprobe(bad)
    with pytest.raises(TypeError, match="Kprobe"):
        await m.kprobes.unregister_kprobes([kp, bad, kp2])
    assert kp.registered and kp2.registered and kp.addr is not None
    assert await m.call("kprobe_target", 30) == 10
    assert await m.call("kprobe_target2", 30) == 11
    assert hits == ["kprobe_target", "kprobe_target2"]
    await m.kprobes.unregister_kprobes([kp, kp2])
    if isinstance(bad, Kretprobe):
        await m.kprobes.unregister_kretprobe(bad)
    await healthy(m)


async def test_an_incorrect_probe_in_a_batch_is_skipped_and_the_rest_go(m):
    """The kernel's rule stays: a never-registered probe gets addr None, the others are
    unregistered in the same grace period."""
    kp, kp2 = Kprobe(symbol_name="kprobe_target"), Kprobe(symbol_name="kprobe_target2")
    stranger = Kprobe(symbol_name="do_fork")
    await m.kprobes.register_kprobes([kp, kp2])
    gp = m.statistics().grace_periods
    await m.kprobes.unregister_kprobes([kp, stranger, kp2])
    assert m.statistics().grace_periods == gp + 1
    assert stranger.addr is None and not kp.registered and not kp2.registered
    await healthy(m)


@pytest.mark.parametrize("at_hit", [1, 4, 16])
async def test_cancelling_a_register_batch_rolls_it_back(m, at_hit):
    """register_kprobes of 1000 probes cancelled midway (at the n-th do_fork hit, while every
    CPU runs fork_loop) leaves no probe of the batch registered, no slot used and the text
    original."""
    count = [0]
    scope = trio.CancelScope()

    def trigger(p, regs):
        count[0] += 1
        if count[0] == at_hit:
            scope.cancel()
    trip = Kprobe(symbol_name="do_fork", pre_handler=trigger)
    await m.kprobes.register_kprobe(trip)
    names = ["kprobe_target", "kprobe_target2", "fib", "bench_target", "vfs_read",
             "tcp_v4_rcv", "do_sys_open", "sys_open"]
    batch = [Kprobe(symbol_name=names[i % len(names)]) for i in range(1000)]
    async with trio.open_nursery() as n:
        busy = await _busy(m, n)
        with scope:
            await m.kprobes.register_kprobes(batch)
        busy.cancel()
    registered = [p.registered for p in batch]
    assert registered in ([True] * 1000, [False] * 1000)
    if registered[0]:
        await m.kprobes.unregister_kprobes(batch)
    await m.kprobes.unregister_kprobe(trip)
    assert m.kprobes.probes() == []
    await healthy(m)


@pytest.mark.parametrize("at_hit", [1, 2, 5, 20])
async def test_cancelling_an_unregister_batch_is_all_or_nothing(m, at_hit):
    """unregister_kprobes cancelled during its text sync or its grace period either
    unregisters the whole batch (shielded from disarm to free) or nothing; afterwards the
    probes can be registered and unregistered again, and no slot leaks."""
    count = [0]
    scope = trio.CancelScope()

    def trigger(p, regs):
        count[0] += 1
        if count[0] == at_hit:
            scope.cancel()
    trip = Kprobe(symbol_name="do_fork", pre_handler=trigger)
    names = ["kprobe_target", "kprobe_target2", "fib", "bench_target"]
    batch = [Kprobe(symbol_name=s) for s in names]
    await m.kprobes.register_kprobes(batch)
    await m.kprobes.register_kprobe(trip)
    async with trio.open_nursery() as n:
        busy = await _busy(m, n)
        with scope:
            await m.kprobes.unregister_kprobes(batch)
        busy.cancel()
    registered = [p.registered for p in batch]
    assert registered in ([True] * 4, [False] * 4)
    if not registered[0]:
        assert all(p.addr is not None for p in batch)
        for p in batch:
            p.addr = None                              # as Linux asks of a re-register
        await m.kprobes.register_kprobes(batch)        # not "already registered"
    await m.kprobes.unregister_kprobes(batch)
    assert not any(p.registered for p in batch)
    await m.kprobes.unregister_kprobe(trip)
    await healthy(m)


@pytest.mark.parametrize("bad", [object(), "kprobe_target", None])
async def test_a_bad_entry_in_a_register_batch_registers_nothing(m, bad):
    """A TypeError in a batch (not only a KprobeError) leaves no probe of it registered."""
    ok = Kprobe(symbol_name="kprobe_target")
    with pytest.raises(TypeError, match="Kprobe"):
        await m.kprobes.register_kprobes([ok, bad])
    assert not ok.registered
    assert text_is_pristine(m)
    await healthy(m)


@pytest.mark.parametrize("entry, why", [
    (None, "Jprobe.entry must be a guest function (a symbol or an address) or a Python "
           "function, not None"),
    (3.5, "Jprobe.entry must be a function, not float")])
async def test_a_jprobe_without_a_usable_entry_is_refused_at_registration(m, entry, why):
    """A jprobe's entry is checked when it is registered, with a message that says what it
    may be, and the batch it came in registers nothing: it is never left to fail inside a
    hit."""
    ok = Jprobe(lambda x: jprobe_return(), symbol_name="kprobe_target2")
    with pytest.raises(TypeError) as err:
        await m.kprobes.register_jprobes([ok, Jprobe(entry, symbol_name="kprobe_target")])
    assert str(err.value) == why
    assert not ok.kp.registered and text_is_pristine(m)
    assert await m.call("kprobe_target", 30) == 10
    await healthy(m)


async def test_a_failing_batch_raises_with_its_index_and_rolls_back(m):
    """A KprobeError midway (unknown symbol) rolls back, with .index and the errno."""
    ok = Kprobe(symbol_name="kprobe_target")
    with pytest.raises(KprobeError, match="probe 1") as err:
        await m.kprobes.register_kprobes([ok, Kprobe(symbol_name="no_such_symbol")])
    assert err.value.errno == errno.ENOENT and err.value.index == 1
    assert not ok.registered and text_is_pristine(m)
    await healthy(m)


async def test_a_jprobe_entry_without_jprobe_return_oopses_and_leaves_the_cpu_idle(m):
    """A Python jprobe entry that returns normally oopses its task with a message naming
    jprobe_return(); the CPU's control block is idle again: later hits there are hits,
    and unregister succeeds."""
    jp = Jprobe(lambda v: None, symbol_name="kprobe_target")
    await m.kprobes.register_jprobe(jp)
    with pytest.raises(Oops, match=r"without calling jprobe_return\(\)"):
        await m.call("kprobe_target", 30, cpu=1)
    await m.kprobes.unregister_jprobe(jp)
    seen = []
    good = Jprobe(lambda v: (seen.append(v), jprobe_return()), symbol_name="kprobe_target")
    await m.kprobes.register_jprobe(good)
    assert await m.call("kprobe_target", 30, cpu=1) == 10
    await m.kprobes.unregister_jprobe(good)
    assert seen == [30] and good.nmissed == 0
    await healthy(m)


# == item 2: one machine, one kind ==================================================
async def test_a_probe_registered_on_another_machine_is_refused():
    """Registering a probe that another machine holds is EBUSY; unregistering it on the
    wrong machine is EINVAL and changes nothing; the right machine still owns it."""
    hits = []
    kp = Kprobe(symbol_name="kprobe_target", pre_handler=_pre(hits))
    async with Machine(cpus=2, seed=1) as m1, Machine(cpus=2, seed=1) as m2:
        await m1.kprobes.register_kprobe(kp)
        with pytest.raises(KprobeError, match="another machine") as err:
            await m2.kprobes.register_kprobe(kp)
        assert err.value.errno == errno.EBUSY
        addr = kp.addr
        with pytest.raises(KprobeError, match="another machine") as err:
            await m2.kprobes.unregister_kprobe(kp)
        assert err.value.errno == errno.EINVAL
        assert kp.addr == addr and kp.registered
        assert await m1.call("kprobe_target", 30) == 10
        assert await m2.call("kprobe_target", 30) == 10
        assert hits == ["kprobe_target"]
        await m1.kprobes.unregister_kprobe(kp)
        assert not kp.registered
        kp.addr = None
        await m2.kprobes.register_kprobe(kp)      # free again: any machine may take it
        await m2.kprobes.unregister_kprobe(kp)
        await healthy(m1)
        await healthy(m2)


async def test_registering_a_registered_probe_says_so(m):
    """Registering a probe twice is EINVAL "already registered", by any register function,
    also within one batch, and the probe stays registered."""
    kp = Kprobe(symbol_name="kprobe_target")
    await m.kprobes.register_kprobe(kp)
    with pytest.raises(KprobeError, match="already registered") as err:
        await m.kprobes.register_kprobe(kp)
    assert err.value.errno == errno.EINVAL
    with pytest.raises(KprobeError, match="already registered"):
        await m.kprobes.register_kprobes([kp])
    twice = Kprobe(symbol_name="kprobe_target2")
    with pytest.raises(KprobeError, match="already registered|twice") as err:
        await m.kprobes.register_kprobes([twice, twice])
    assert err.value.index == 1 and not twice.registered
    assert kp.registered
    await m.kprobes.unregister_kprobe(kp)
    await healthy(m)


async def test_a_kretprobes_own_kprobe_cannot_be_unregistered_alone(m):
    """unregister_kprobe(rp.kp) is EINVAL and unregister_jprobe(rp) a TypeError; the
    kretprobe stays registered and its handler runs until unregister_kretprobe."""
    seen = []
    rp = Kretprobe(handler=lambda ri, regs: seen.append(1), symbol_name="kprobe_target")
    await m.kprobes.register_kretprobe(rp)
    with pytest.raises(KprobeError, match="Kretprobe") as err:
        await m.kprobes.unregister_kprobe(rp.kp)
    assert err.value.errno == errno.EINVAL
    with pytest.raises(TypeError, match="Jprobe"):
        await m.kprobes.unregister_jprobe(rp)
    with pytest.raises(KprobeError, match="belongs to a Jprobe"):
        await m.kprobes.register_kprobe(Jprobe(lambda v: None, symbol_name="fib").kp)
    assert rp.kp.registered and rp.kp.addr is not None
    assert await m.call("kprobe_target", 30) == 10
    assert seen == [1]
    await m.kprobes.unregister_kretprobe(rp)
    assert await m.call("kprobe_target", 30) == 10
    assert seen == [1]
    await healthy(m)


@pytest.mark.parametrize("field, value", [("offset", 1.0), ("addr", 1049072.0),
                                          ("offset", "4"), ("symbol_name", 42)])
async def test_a_probe_field_of_the_wrong_type_is_a_typeerror(m, field, value):
    """A float offset or addr (or a str offset, an int symbol name) is refused at
    registration with a TypeError; kprobes/list stays readable."""
    kw = {"symbol_name": "kprobe_target"}
    if field == "addr":
        kw = {"addr": value}
    else:
        kw[field] = value
    kp = Kprobe(**kw)
    with pytest.raises(TypeError, match=field):
        await m.kprobes.register_kprobe(kp)
    assert not kp.registered
    assert m.debugfs.read("kprobes/list") == ""
    await healthy(m)


@pytest.mark.parametrize("kw, exc", [({"data_size": -1}, KprobeError),
                                     ({"data_size": 1.5}, TypeError),
                                     ({"maxactive": "3"}, TypeError)])
async def test_bad_kretprobe_sizes_are_refused(m, kw, exc):
    """A negative data_size is EINVAL; a non-integer size or maxactive is a TypeError."""
    rp = Kretprobe(symbol_name="kprobe_target", **kw)
    with pytest.raises(exc) as err:
        await m.kprobes.register_kretprobe(rp)
    if exc is KprobeError:
        assert err.value.errno == errno.EINVAL
    assert not rp.kp.registered
    await healthy(m)


async def _coro(*args):
    return 0


@pytest.mark.parametrize("make", [
    lambda: Kprobe(symbol_name="kprobe_target", pre_handler=_coro),
    lambda: Kprobe(symbol_name="kprobe_target", post_handler=_coro),
    lambda: Kprobe(symbol_name="kprobe_target", fault_handler=_coro),
    lambda: Kprobe(symbol_name="kprobe_target", pre_handler=42),
    lambda: Kretprobe(handler=_coro, symbol_name="kprobe_target"),
    lambda: Kretprobe(entry_handler=_coro, symbol_name="kprobe_target"),
    lambda: Jprobe(_coro, symbol_name="kprobe_target"),
], ids=["pre", "post", "fault", "int", "ret", "entry", "jprobe"])
async def test_coroutine_or_non_callable_handlers_are_a_typeerror(m, make):
    """An async def handler (its coroutine would be truthy and never run) or a non-callable
    one is refused with a TypeError at registration."""
    probe = make()
    register = {Kprobe: m.kprobes.register_kprobe, Kretprobe: m.kprobes.register_kretprobe,
                Jprobe: m.kprobes.register_jprobe}[type(probe)]
    with pytest.raises(TypeError, match="handler|entry"):
        await register(probe)
    kp = probe if isinstance(probe, Kprobe) else probe.kp
    assert not kp.registered
    await healthy(m)


def _interrupt(*_args):
    raise KeyboardInterrupt


# Each handler a probe can have, and each path it runs on: the trap path (pre, post), the
# jump-optimized detour (an optimized pre_handler), a kretprobe's entry and its return
# through the trampoline (trapped with the sysctl at 0, trap-free at 1).
INTERRUPTED = {
    "pre": (0, lambda: Kprobe(symbol_name="kprobe_target", pre_handler=_interrupt)),
    "post": (0, lambda: Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: 0,
                               post_handler=_interrupt)),
    "optimized pre": (1, lambda: Kprobe(symbol_name="kprobe_target", offset=4,
                                        pre_handler=_interrupt)),
    "kretprobe entry": (0, lambda: Kretprobe(symbol_name="kprobe_target",
                                             entry_handler=_interrupt)),
    "kretprobe return, trapped": (0, lambda: Kretprobe(symbol_name="kprobe_target",
                                                       handler=_interrupt)),
    "kretprobe return, trap-free": (1, lambda: Kretprobe(symbol_name="kprobe_target",
                                                         handler=_interrupt)),
}


@pytest.mark.parametrize("which", list(INTERRUPTED))
async def test_keyboard_interrupt_in_a_handler_is_not_swallowed(which):
    """A KeyboardInterrupt raised by any handler, on any path, propagates out of the
    machine, as ^C would; it is not turned into an oops nor lost."""
    optimize, make = INTERRUPTED[which]
    caught = None
    oopses = None
    try:
        async with Machine(cpus=2, seed=1) as m:
            oopses = m.oopses
            await m.sysctl.write("debug/kprobes-optimization", str(optimize))
            probe = make()
            if isinstance(probe, Kretprobe):
                await m.kprobes.register_kretprobe(probe)
            else:
                await m.kprobes.register_kprobe(probe)
                await m.kprobes.optimizer.wait_for_kprobe_optimizer()
                assert m.kprobes.optimizer.is_optimized(probe.addr) == bool(optimize)
            await m.call("kprobe_target", 30)
    except BaseException as exc:       # noqa: BLE001 - KeyboardInterrupt must not escape
        caught = exc
    assert caught is not None
    if isinstance(caught, BaseExceptionGroup):
        match, _ = caught.split(KeyboardInterrupt)
        assert match is not None, caught
    else:
        assert isinstance(caught, KeyboardInterrupt), caught
    assert oopses == []


# == item 11: one form for errors ===================================================
@pytest.mark.parametrize("call", [
    lambda m: m.kprobes.register_kprobe(None),
    lambda m: m.kprobes.register_kprobes([None]),
    lambda m: m.kprobes.register_kretprobe(Kprobe(symbol_name="fib")),
    lambda m: m.kprobes.register_jprobes([object()]),
    lambda m: m.kprobes.unregister_kprobe(None),
    lambda m: m.kprobes.unregister_kretprobes([None]),
    lambda m: m.kprobes.unregister_jprobes(["x"]),
    lambda m: m.kprobes.enable_kprobe(None),
    lambda m: m.kprobes.disable_kprobe("kprobe_target"),
    lambda m: m.kprobes.register_kprobes(None),
], ids=["reg-none", "regs-none", "ret-kprobe", "jps-object", "unreg-none", "unregret-none",
        "unregj-str", "enable-none", "disable-str", "regs-notlist"])
async def test_not_a_probe_is_a_typeerror(m, call):
    """Every kprobes function given something that is not a probe of its kind raises a
    TypeError that names the expected type, never an AttributeError from inside."""
    with pytest.raises(TypeError, match="Kprobe|Kretprobe|Jprobe|list"):
        await call(m)
    await healthy(m)


async def test_an_unknown_symbol_is_a_clear_error(m):
    """m.call of an unknown symbol says which symbol (a KeyError that is also a
    ValueError, so both spellings of "bad input" catch it)."""
    with pytest.raises(ValueError, match="no_such_function"):
        await m.call("no_such_function")
    with pytest.raises(KeyError, match="no_such_function"):
        await m.call("no_such_function")
    await healthy(m)


async def test_a_handler_reading_a_register_the_arch_lacks_gets_an_attribute_error(m):
    """`regs.nosuch` and `regs["nosuch"]` in a handler are AttributeErrors that name the
    register (and the arch); a handler that catches them goes on, the call's result is
    exact, and the machine is healthy after."""
    seen = []

    def pre(p, regs):
        seen.append(regs.ip)
        for read in (lambda: regs.nosuch, lambda: regs["nosuch"]):
            try:
                read()
            except AttributeError as err:
                seen.append(str(err))
        return 0

    kp = Kprobe(symbol_name="kprobe_target", pre_handler=pre)
    await m.kprobes.register_kprobe(kp)
    assert await m.call("kprobe_target", 30, cpu=1) == 10
    await m.kprobes.unregister_kprobe(kp)
    assert seen[0] == kp.addr
    assert "nosuch" in seen[1] and "Regs_x86_64" in seen[1]
    assert seen[2] == "no register 'nosuch' on x86_64"
    await healthy(m)


async def test_registration_refusals_name_the_probe_and_its_place_in_the_batch(m):
    """A single registration's refusal carries no index and no "probe N:" prefix; in a
    batch, a probe given twice is refused at its second place before anything changes,
    and a probe already registered is refused at its own place."""
    kp = Kprobe(symbol_name="kprobe_target")
    await m.kprobes.register_kprobe(kp)
    with pytest.raises(KprobeError) as err:
        await m.kprobes.register_kprobe(kp)
    assert (str(err.value), err.value.index) == (
        f"[Errno 22] EINVAL: {kp!r} is already registered", None)
    other = Kprobe(symbol_name="kprobe_target2")
    with pytest.raises(KprobeError) as err:
        await m.kprobes.register_kprobes([other, kp])
    assert (str(err.value), err.value.index) == (
        f"[Errno 22] EINVAL: probe 1: {kp!r} is already registered", 1)
    await m.kprobes.unregister_kprobe(kp)
    with pytest.raises(KprobeError) as err:
        await m.kprobes.register_kprobes([other, kp, other])
    assert (str(err.value), err.value.index) == (
        f"[Errno 22] EINVAL: probe 2: {other!r} appears twice in the batch (it would be "
        f"already registered)", 2)
    assert not other.registered and not kp.registered and text_is_pristine(m)
    await healthy(m)

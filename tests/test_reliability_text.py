"""Reliability, part 3: text writes and modules (items 9 and 10 of the reliability issue)."""

import errno

import pytest

from _health import healthy
from smpkprobes import Kprobe, KprobeError, Machine

# x86_64: mov eax, 42; ret
RETURN_42 = bytes.fromhex("b82a000000c3")


async def test_write_memory_over_an_armed_probe_is_ebusy():
    """m.write_memory over an armed probe's bytes is refused with EBUSY: the probe keeps
    firing, and unregister restores the original text."""
    async with Machine(cpus=2, seed=1) as m:
        hits = []
        kp = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: hits.append(1))
        await m.kprobes.register_kprobe(kp)
        armed = m.read_memory(kp.addr, 4)
        with pytest.raises(KprobeError, match="kprobe_target") as err:
            m.write_memory(kp.addr, b"\x90")
        assert err.value.errno == errno.EBUSY
        with pytest.raises(KprobeError) as err:
            await m.text_poke(kp.addr - 1, b"\x90\x90")
        assert err.value.errno == errno.EBUSY
        assert m.read_memory(kp.addr, 4) == armed
        assert await m.call("kprobe_target", 30) == 10 and hits == [1]
        await m.kprobes.unregister_kprobe(kp)
        await healthy(m)


@pytest.mark.parametrize("how", ["write_memory", "text_poke"])
async def test_a_host_text_write_reaches_every_cpu(how):
    """A host write into text that every CPU has already run (and translated) is seen by
    every CPU on its next call: the write goes through text patching."""
    async with Machine(cpus=3, seed=1) as m:
        addr = m.kallsyms_lookup_name("kprobe_target")
        orig = m.read_memory(addr, len(RETURN_42))
        for cpu in range(3):
            assert await m.call("kprobe_target", 30, cpu=cpu) == 10
        if how == "text_poke":
            await m.text_poke(addr, RETURN_42)
        else:
            m.write_memory(addr, RETURN_42)
        assert [await m.call("kprobe_target", 30, cpu=c) for c in range(3)] == [42] * 3
        await m.text_poke(addr, orig)
        assert [await m.call("kprobe_target", 30, cpu=c) for c in range(3)] == [10] * 3
        await healthy(m)


async def test_write_memory_on_data_is_unchanged():
    """Data writes are plain writes, and unmapped ones a clear error (a ValueError)."""
    async with Machine(cpus=1, seed=1) as m:
        addr = m.kallsyms_lookup_name("target_return_address")
        m.write_memory(addr, bytes(8))
        assert m.read_memory(addr, 8) == bytes(8)
        with pytest.raises(ValueError, match="not mapped"):
            m.write_memory(0x10, b"x")
        await healthy(m)


async def test_a_new_probe_at_a_gone_address_rearms_it():
    """Unload a module with a probe (GONE), load it again, register a new probe there: it
    fires; the old one stays listed as GONE until unregistered (Linux's
    register_aggr_kprobe)."""
    async with Machine(cpus=2, seed=1) as m:
        mod = await m.load_module("example_mod")
        old_hits, new_hits = [], []
        old = Kprobe(symbol_name="example_mod_func", pre_handler=lambda p, r: old_hits.append(1))
        await m.kprobes.register_kprobe(old)
        assert await m.call("example_mod_func", 41) == 42
        await m.unload_module(mod)
        assert old.gone
        mod = await m.load_module("example_mod")
        pristine = m.read_memory(m.kallsyms_lookup_name("example_mod_func"), 8)
        new = Kprobe(symbol_name="example_mod_func", pre_handler=lambda p, r: new_hits.append(1))
        await m.kprobes.register_kprobe(new)
        assert not new.gone
        for cpu in range(2):
            assert await m.call("example_mod_func", 41, cpu=cpu) == 42
        assert (old_hits, new_hits) == ([1], [1, 1])
        listing = m.debugfs.read("kprobes/list").splitlines()
        assert len(listing) == 2 and sum("[GONE]" in line for line in listing) == 1
        await m.kprobes.unregister_kprobes([old, new])
        assert m.read_memory(new.addr, 8) == pristine
        assert m.debugfs.read("kprobes/list") == ""
        await m.unload_module(mod)
        await healthy(m)


async def test_a_kprobe_event_on_a_module_comes_back_with_it():
    """A kprobe_events probe on a module function fires again once the module is loaded
    again, as trace_kprobe's module notifier re-registers it.  The probe names its module
    (`MOD:SYM`): the kernel's notifier re-registers only those (trace_kprobe_within_module);
    a bare-symbol probe stays GONE (tests/test_kprobe_events.py)."""
    async with Machine(cpus=2, seed=1) as m:
        mod = await m.load_module("example_mod")
        await m.tracefs.write("kprobe_events", "p:modfunc example_mod:example_mod_func x=$arg1")
        await m.tracefs.write("events/kprobes/modfunc/enable", "1")
        assert await m.call("example_mod_func", 1) == 2
        await m.unload_module(mod)
        assert m.debugfs.read("kprobes/list").endswith("[GONE]\n")
        mod = await m.load_module("example_mod")
        assert "[GONE]" not in m.debugfs.read("kprobes/list")
        assert await m.call("example_mod_func", 2) == 3
        lines = [ln for ln in m.tracefs.read("trace").splitlines() if "modfunc:" in ln]
        assert [ln.split()[-1] for ln in lines] == ["x=0x1", "x=0x2"]    # default type x64
        await m.tracefs.write("events/kprobes/modfunc/enable", "0")
        await m.tracefs.write("kprobe_events", "")
        await m.unload_module(mod)
        await healthy(m)


async def test_a_module_event_across_unload_disable_delete_and_reload():
    """While its module is away a MOD:SYM event stays listed (kprobe_events unchanged) with
    its kprobe GONE; disabling it then keeps it disabled when the module comes back (the
    kprobe is registered disarmed, and does not fire); deleting one while the module is away
    unregisters it for good: the next load brings back only the events still defined."""
    async with Machine(cpus=2, seed=1) as m:
        fs = m.tracefs
        mod = await m.load_module("example_mod")
        await fs.write("kprobe_events", "p:modfunc example_mod:example_mod_func x=$arg1\n"
                                        "r:modret example_mod:example_mod_func r=$retval")
        listing = fs.read("kprobe_events")
        await fs.write("events/kprobes/enable", "1")
        assert await m.call("example_mod_func", 1) == 2
        await m.unload_module(mod)
        assert fs.read("kprobe_events") == listing
        assert m.debugfs.read("kprobes/list").count("[GONE]") == 2
        assert fs.read("events/kprobes/modfunc/enable") == "1\n"
        await fs.write("events/kprobes/modfunc/enable", "0")
        assert fs.read("events/kprobes/modfunc/enable") == "0\n"

        mod = await m.load_module("example_mod")
        assert fs.read("kprobe_events") == listing
        listed = m.debugfs.read("kprobes/list")
        assert "[GONE]" not in listed and listed.count("[DISABLED]") == 1
        assert await m.call("example_mod_func", 2) == 3
        events = [ln.split()[3] for ln in fs.read("trace").splitlines() if ln[:1] != "#"]
        assert events == ["modfunc:", "modret:", "modret:"]          # modfunc stayed off
        assert [(tp.name, tp.nhit) for tp in fs.events()] == [("modfunc", 1), ("modret", 2)]

        await m.unload_module(mod)
        await fs.write("events/kprobes/modret/enable", "0")
        await fs.write("kprobe_events", "-:modret", append=True)
        assert fs.read("kprobe_events") == listing.splitlines(keepends=True)[0]
        assert m.debugfs.read("kprobes/list").count("[GONE]") == 1
        assert fs.read("trace").count("\n") == 6      # removing an event once enabled: reset
        mod = await m.load_module("example_mod")
        [kp_line] = m.debugfs.read("kprobes/list").splitlines()
        assert "  k  example_mod_func+0x0" in kp_line and "[GONE]" not in kp_line
        with pytest.raises(KprobeError) as err:
            await fs.write("events/kprobes/modret/enable", "1")
        assert err.value.errno == errno.ENOENT
        await fs.write("kprobe_events", "")
        assert m.debugfs.read("kprobes/list") == ""
        await m.unload_module(mod)
        await healthy(m)

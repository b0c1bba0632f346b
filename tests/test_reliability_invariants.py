"""Reliability, part 6: the invariant checker sees stuck state (item 8 of the reliability
issue).  Each test injects one stuck state by hand and asserts the exact report."""

import heapq

from smpkprobes import Kprobe, Machine
from smpkprobes.kprobes._state import Status


async def test_a_registration_half_done_is_a_registry_violation():
    """A probe marked registered that no site links (its registration, or unregistration,
    left half done once the registry lock is free) is reported."""
    async with Machine(cpus=1, seed=1, invariants="record") as m:
        kp = Kprobe(symbol_name="kprobe_target")
        await m.kprobes.register_kprobe(kp)
        assert await m.call("kprobe_target", 30) == 10      # a quantum: the checker sees kp
        site = m.kprobes._kprobe_table.pop(kp.addr)                # unlinked, still "registered"
        m.kprobes.generation += 1
        assert await m.call("kprobe_target2", 30) == 11
        m.kprobes._kprobe_table[kp.addr] = site
        m.kprobes.generation += 1
        await m.kprobes.unregister_kprobe(kp)
    assert "registry: <Kprobe kprobe_target+0x0> is marked registered here but is linked " \
           "at no site (a registration half done)" in m.invariants.violations


async def test_a_leaked_slot_is_a_slots_violation():
    """An instruction slot in use that no site owns breaks free + in use == total."""
    async with Machine(cpus=1, seed=1, invariants="record") as m:
        slots = m.kprobes.slots
        leaked = heapq.heappop(slots._free)
        slots._used.add(leaked)
        m.kprobes.generation += 1
        assert await m.call("kprobe_target", 30) == 10
        slots._used.discard(leaked)
        heapq.heappush(slots._free, leaked)
    assert m.invariants.violations == [f"slots: insn slot {leaked:#x} is in use by no probe "
                                       f"(leaked)"]


async def test_a_lost_slot_breaks_the_slot_count():
    """A slot neither free, used nor garbage (lost) is reported by the count."""
    async with Machine(cpus=1, seed=1, invariants="record") as m:
        slots = m.kprobes.slots
        total = len(slots._free)
        lost = heapq.heappop(slots._free)
        m.kprobes.generation += 1
        assert await m.call("kprobe_target", 30) == 10
        heapq.heappush(slots._free, lost)
    assert m.invariants.violations == [f"slots: free {total - 1} + in use 0 + garbage 0 != "
                                       f"{total} slots"]


async def test_a_stuck_control_block_is_a_ctlblk_violation():
    """A CPU whose kprobe_ctlblk stays HIT_ACTIVE with no probe in flight (the jprobe that
    never returned) is reported at its next quantum boundary."""
    async with Machine(cpus=2, seed=1, invariants="record") as m:
        kp = Kprobe(symbol_name="kprobe_target")
        await m.kprobes.register_kprobe(kp)
        kcb = m.kprobes.kprobe_ctlblk[1]
        kcb.current_kprobe = m.kprobes._kprobe_table[kp.addr]
        kcb.kprobe_status = Status.HIT_ACTIVE
        assert await m.call("kprobe_target2", 30, cpu=1) == 11
        kcb.reset()
        await m.kprobes.unregister_kprobe(kp)
    assert m.invariants.violations == ["ctlblk: cpu1's kprobe_ctlblk is HIT_ACTIVE with no "
                                       "probe in flight (preempt count 0)"]


async def test_an_orphan_breakpoint_is_reported():
    """A breakpoint written into the text that no registered probe owns is reported at
    the next quantum boundary, not only at shutdown."""
    async with Machine(cpus=1, seed=1, invariants="record") as m:
        addr = m.kallsyms_lookup_name("fib")
        orig = m.read_memory(addr, len(m.backend.breakpoint))
        await m.text_poke(addr, m.backend.breakpoint)
        assert await m.call("kprobe_target", 30) == 10
        assert m.invariants.violations == ["orphans: a breakpoint at fib+0x0 that no "
                                           "registered probe owns"]
        await m.text_poke(addr, orig)


async def test_an_orphan_is_a_breakpoint_where_an_instruction_starts():
    """Inside a function, breakpoint bytes are an orphan only where an instruction starts
    (kprobe_target+0x4, `mov ecx, edi`); inside an instruction (+0x7, the immediate of
    `mov eax, imm32`) they are an operand, which no CPU executes as a breakpoint."""
    async with Machine(cpus=1, seed=1, invariants="record") as m:
        base = m.kallsyms_lookup_name("kprobe_target")
        orig = m.read_memory(base, 16)
        await m.text_poke(base + 7, m.backend.breakpoint)
        await m.text_poke(base + 4, m.backend.breakpoint)
        assert await m.call("kprobe_target2", 30) == 11
        await m.text_poke(base, orig)
        assert await m.call("kprobe_target", 30) == 10
    assert m.invariants.violations == ["orphans: a breakpoint at kprobe_target+0x4 that no "
                                       "registered probe owns"]


async def test_a_probe_on_two_machines_is_reported():
    """A probe linked in one machine's registry but owned by another is reported."""
    async with Machine(cpus=1, seed=1, invariants="record") as m1, \
            Machine(cpus=1, seed=1, invariants="record") as m2:
        kp = Kprobe(symbol_name="kprobe_target")
        await m2.kprobes.register_kprobe(kp)
        kp._kprobes = m1.kprobes                 # as if m1 had taken it too
        m2.kprobes.generation += 1
        assert await m2.call("kprobe_target", 30) == 10
        kp._kprobes = m2.kprobes
        await m2.kprobes.unregister_kprobe(kp)
    assert m2.invariants.violations == ["registry: <Kprobe kprobe_target+0x0> is registered "
                                        "on this machine and on another one"]
    assert m1.invariants.violations == []


async def test_a_clean_run_has_no_stuck_state():
    """The same checks stay silent on an ordinary run with probes, batches and calls."""
    async with Machine(cpus=2, seed=1, invariants="record") as m:
        kps = [Kprobe(symbol_name=s) for s in ("kprobe_target", "fib", "kprobe_target")]
        await m.kprobes.register_kprobes(kps)
        assert await m.call("fib", 8, cpu=0) == 21
        await m.kprobes.unregister_kprobes(kps)
        assert m.invariants.violations == []
        assert m.invariants.checks > 0


async def test_a_leaked_detour_buffer_is_a_slots_violation():
    """A detour buffer that no optimized probe owns and that waits for no grace period (an
    optimized probe dropped without freeing its detour) is reported."""
    async with Machine(cpus=1, seed=1, invariants="record") as m:
        opt = m.kprobes.optimizer
        kp = Kprobe(symbol_name="kprobe_target", offset=4, pre_handler=lambda p, r: 0)
        await m.kprobes.register_kprobe(kp)
        await opt.wait_for_kprobe_optimizer()
        op = opt.ops[kp.addr]
        del opt.ops[kp.addr]                      # dropped, its detour neither freed nor queued
        m.kprobes.generation += 1
        assert await m.call("kprobe_target2", 30) == 11
        opt.ops[kp.addr] = op
        await m.kprobes.unregister_kprobe(kp)
    assert m.invariants.violations == [f"slots: detour buffer {op.stub:#x} is in use by no "
                                       f"probe (leaked)"]

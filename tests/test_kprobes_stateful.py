"""A stateful test of the probe core: rules over registration, batches, enable/disable,
the global switch and guest calls on CPUs; invariants after every step.

The machine lives in a trio loop on a helper thread for the whole example; each rule runs
one step on it through `trio.from_thread.run`.  A failure prints as a replayable program of
rule calls, as Hypothesis does.
"""

import threading

from smpkprobes import cpus

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize,
                                 invariant, rule)

from smpkprobes import Kprobe, KprobeError, Machine
from smpkprobes.machine._memory import SLOTS

FUNCS = ("kprobe_target", "fib", "do_fork", "bench_target")
CALLS = {"kprobe_target": (30,), "fib": (6,), "do_fork": (0, 0, 0, 0, 0, 0), "bench_target": (4,)}


class _Host:
    """A machine running in trio on its own thread."""

    def __init__(self, seed: int, arch: str):
        self.ready = threading.Event()
        self.thread = threading.Thread(target=trio.run, args=(self._main, seed, arch),
                                       daemon=True)
        self.thread.start()
        self.ready.wait()

    async def _main(self, seed, arch):
        async with Machine(arch=arch, cpus=3, seed=seed, quantum=(4, 300)) as m:
            self.m = m
            self.token = trio.lowlevel.current_trio_token()
            self.stop = trio.Event()
            self.ready.set()
            await self.stop.wait()

    def run(self, afn, *args):
        return trio.from_thread.run(afn, *args, trio_token=self.token)

    def close(self):
        trio.from_thread.run_sync(self.stop.set, trio_token=self.token)
        self.thread.join()


class KprobesMachine(RuleBasedStateMachine):
    probes = Bundle("probes")

    @initialize(seed=st.integers(0, 2**16), arch=st.sampled_from(cpus.available()))
    def boot(self, seed, arch):
        self.host = _Host(seed, arch)
        m = self.host.m
        self.m = m
        self.spots = []
        for f in FUNCS:
            self.spots += sorted(m.kprobes._insn_boundaries(m.kallsyms.lookup(f)))[:6]
        self.bp = m.backend.breakpoint
        self.original = {a: m.read_memory(a, len(self.bp)) for a in self.spots}
        self.calls = {f: None for f in FUNCS}
        self.handler_runs = 0
        self.live: set[int] = set()

    def teardown(self):
        if hasattr(self, "host"):
            self.host.close()

    def _pre(self, p, regs):
        self.handler_runs += 1
        assert id(p) in self.live, "handler of an unregistered probe ran"

    def _new(self, addr, post):
        return Kprobe(addr=addr, pre_handler=self._pre,
                      post_handler=(lambda p, r, f: None) if post else None)

    @rule(target=probes, i=st.integers(0, 10**6), post=st.booleans())
    def register(self, i, post):
        kp = self._new(self.spots[i % len(self.spots)], post)
        try:
            self.host.run(self.m.kprobes.register_kprobe, kp)
        except KprobeError:
            return kp            # an unsteppable spot: stays unregistered
        self.live.add(id(kp))
        return kp

    @rule(target=probes, idxs=st.lists(st.integers(0, 10**6), min_size=1, max_size=4))
    def register_batch(self, idxs):
        kps = [self._new(self.spots[i % len(self.spots)], False) for i in idxs]
        try:
            self.host.run(self.m.kprobes.register_kprobes, kps)
        except KprobeError as e:
            assert not any(k.registered for k in kps), "batch rollback left probes behind"
            assert e.index is not None
            return kps[0]
        self.live.update(id(k) for k in kps)
        return kps[0]

    @rule(kp=consumes(probes))
    def unregister(self, kp):
        self.host.run(self.m.kprobes.unregister_kprobe, kp)
        self.live.discard(id(kp))
        assert not kp.registered

    @rule(kps=st.lists(consumes(probes), min_size=1, max_size=4, unique_by=id))
    def unregister_batch(self, kps):
        gp = self.m.statistics().grace_periods
        self.host.run(self.m.kprobes.unregister_kprobes, kps)
        for k in kps:
            self.live.discard(id(k))
        assert self.m.statistics().grace_periods - gp <= 1

    @rule(kp=probes, enable=st.booleans())
    def toggle(self, kp, enable):
        if not kp.registered:
            return
        fn = self.m.kprobes.enable_kprobe if enable else self.m.kprobes.disable_kprobe
        self.host.run(fn, kp)
        assert kp.disabled == (not enable)

    @rule(on=st.booleans())
    def global_switch(self, on):
        self.host.run(self.m.debugfs.write, "kprobes/enabled", "1" if on else "0")

    @rule(funcs=st.lists(st.sampled_from(FUNCS), min_size=1, max_size=4))
    def run_calls(self, funcs):
        async def go():
            results = {}
            async with trio.open_nursery() as n:
                for i, f in enumerate(funcs):
                    async def one(f=f, i=i):
                        results[i] = await self.m.call(f, *CALLS[f], cpu=i % 3)
                    n.start_soon(one)
            return results
        results = self.host.run(go)
        for i, f in enumerate(funcs):
            if f != "do_fork":
                expect = {"kprobe_target": 10, "fib": 8, "bench_target": 9}[f]
                assert results[i] == expect, (f, results[i])

    @invariant()
    def armed_text_matches_registry(self):
        if not hasattr(self, "m"):
            return
        k = self.m.kprobes
        bp = self.bp
        for addr in self.spots:
            site = k.get_kprobe(addr)
            should = site is not None and k.enabled and site.enabled()
            assert (site is not None and site.armed) == should
            text = self.m.read_memory(addr, len(bp))
            # Under a written optprobe jump the text is the jump's (tests/test_optprobes.py).
            want = k.optimizer.expected_text(addr, bp if should else self.original[addr])
            assert text == want, hex(addr)

    @invariant()
    def hits_plus_missed_equals_traps(self):
        if hasattr(self, "m"):
            k = self.m.kprobes
            assert k.hits + k.missed == k.traps

    @invariant()
    def no_cpu_in_a_free_slot(self):
        if not hasattr(self, "m"):
            return
        slots = self.m.kprobes.slots
        size = self.m.backend.slot_size
        for cpu in self.m.cpus:
            pc = cpu.pc
            if SLOTS.start <= pc < SLOTS.end:
                assert slots.is_used(pc - (pc - SLOTS.start) % size)

    @invariant()
    def no_oops(self):
        if hasattr(self, "m"):
            assert self.m.oopses == []


KprobesMachine.TestCase.settings = settings(
    max_examples=15, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestKprobesStateful = KprobesMachine.TestCase

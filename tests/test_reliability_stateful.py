"""Reliability, part 5: register and unregister batches cancelled at random await points.

A Hypothesis state machine over one running machine.  Every rule runs a batch while each
CPU runs guest code (so that text pokes wait for IPIs and unregistration for a grace
period), and cancels the batch at its k-th step, k chosen by Hypothesis: a
`trio.abc.Instrument` counts the steps of the batch's task and cancels its scope there.
After every step: each batch happened entirely or not at all, the text is original
wherever no registered probe is armed, and no instruction slot is held by nobody.
"""

import functools
import threading

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from smpkprobes import Kprobe, Kretprobe, Machine

SPOTS = ("kprobe_target", "kprobe_target2", "fib", "bench_target", "vfs_read", "tcp_v4_rcv")


class _CancelAtStep(trio.abc.Instrument):
    """Cancel `scope` just before the `k`-th step of `task`."""

    def __init__(self, task, scope: trio.CancelScope, k: int):
        self.task, self.scope, self.k, self.steps = task, scope, k, 0

    def before_task_step(self, task):
        if task is self.task:
            self.steps += 1
            if self.steps == self.k:
                self.scope.cancel()


class _Host:
    """A machine running in trio on its own thread."""

    def __init__(self, seed: int, arch: str):
        self.ready = threading.Event()
        self.thread = threading.Thread(target=trio.run, args=(self._main, seed, arch),
                                       daemon=True)
        self.thread.start()
        self.ready.wait()

    async def _main(self, seed, arch):
        async with Machine(arch=arch, cpus=3, seed=seed, quantum=(4, 600),
                           invariants="record") as m:
            # The text checks below expect breakpoints: this machine is about batches and
            # cancellation, not jump optimization (tests/test_optprobes.py covers that).
            await m.sysctl.write("debug/kprobes-optimization", "0")
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


class CancelledBatches(RuleBasedStateMachine):
    @initialize(seed=st.integers(0, 2**16), arch=st.sampled_from(["x86_64", "arm64"]))
    def boot(self, seed, arch):
        self.host = _Host(seed, arch)
        self.m = self.host.m
        self.addrs = {s: self.m.kallsyms_lookup_name(s) for s in SPOTS}
        bp = self.m.backend.breakpoint
        self.original = {s: self.m.read_memory(a, len(bp)) for s, a in self.addrs.items()}
        self.live: list = []            # registered probes (Kprobe or Kretprobe), in order
        self.ran_after_unregister = []

    def teardown(self):
        if hasattr(self, "host"):
            self.host.close()

    def _batch(self, fn, items, k):
        """Run fn(items) with CPUs 1 and 2 busy, cancelled at its k-th step."""
        async def go():
            scope = trio.CancelScope()
            async with trio.open_nursery() as n:
                for cpu in (1, 2):
                    n.start_soon(functools.partial(self.m.call, "fork_loop", 3000, cpu=cpu))
                # Once this returns, the loops run on CPUs 1 and 2.
                assert await self.m.call("fib", 12, cpu=0) == 144

                async def batch():
                    inst = _CancelAtStep(trio.lowlevel.current_task(), scope, k)
                    trio.lowlevel.add_instrument(inst)
                    try:
                        with scope:
                            await fn(items)
                    finally:
                        trio.lowlevel.remove_instrument(inst)
                n.start_soon(batch)
        self.host.run(go)

    def _handler(self, probe_box):
        def pre(p, regs):
            if not p.registered:
                self.ran_after_unregister.append(p)
        return pre

    @rule(names=st.lists(st.sampled_from(SPOTS), min_size=1, max_size=5),
          k=st.integers(1, 6), kind=st.sampled_from(["k", "r"]))
    def register_batch(self, names, k, kind):
        if kind == "k":
            items = [Kprobe(symbol_name=s, pre_handler=self._handler(None)) for s in names]
            fn = self.m.kprobes.register_kprobes
        else:
            items = [Kretprobe(symbol_name=s, maxactive=2) for s in names]
            fn = self.m.kprobes.register_kretprobes
        self._batch(fn, items, k)
        kps = [p if isinstance(p, Kprobe) else p.kp for p in items]
        state = {kp.registered for kp in kps}
        assert len(state) == 1, "a cancelled register batch was left half done"
        if state == {True}:
            self.live.extend(items)

    @rule(data=st.data(), k=st.integers(1, 6))
    def unregister_batch(self, data, k):
        if not self.live:
            return
        n = data.draw(st.integers(1, len(self.live)))
        picked = data.draw(st.permutations(self.live))[:n]
        kps = [p for p in picked if isinstance(p, Kprobe)]
        rps = [p for p in picked if isinstance(p, Kretprobe)]
        for group, fn in ((kps, self.m.kprobes.unregister_kprobes),
                          (rps, self.m.kprobes.unregister_kretprobes)):
            if not group:
                continue
            self._batch(fn, group, k)
            kp_list = [p if isinstance(p, Kprobe) else p.kp for p in group]
            state = {kp.registered for kp in kp_list}
            assert len(state) == 1, "a cancelled unregister batch was left half done"
            assert all(kp.addr is not None for kp in kp_list)
            if state == {False}:
                self.live = [p for p in self.live if not any(p is g for g in group)]

    @invariant()
    def text_matches_the_registry(self):
        if not hasattr(self, "m"):
            return
        bp = self.m.backend.breakpoint
        probed = {(p if isinstance(p, Kprobe) else p.kp).addr for p in self.live}
        for s, a in self.addrs.items():
            want = bp if a in probed else self.original[s]
            assert self.m.read_memory(a, len(bp)) == want, s

    @invariant()
    def no_slot_leaks(self):
        if not hasattr(self, "m"):
            return
        sites = {(p if isinstance(p, Kprobe) else p.kp).addr for p in self.live}
        assert self.m.kprobes.statistics().slots_used <= len(sites)
        if not sites:
            assert self.m.kprobes.statistics().slots_used == 0

    @invariant()
    def registry_is_the_live_set(self):
        if not hasattr(self, "m"):
            return
        listed = sorted(id(p) for _, p in self.m.kprobes.probes())
        assert listed == sorted(id(p if isinstance(p, Kprobe) else p.kp) for p in self.live)

    @invariant()
    def nothing_broke(self):
        if not hasattr(self, "m"):
            return
        assert self.ran_after_unregister == []
        assert self.m.oopses == []
        assert self.m.invariants.violations == []


CancelledBatches.TestCase.settings = settings(
    max_examples=8, stateful_step_count=10, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCancelledBatches = CancelledBatches.TestCase

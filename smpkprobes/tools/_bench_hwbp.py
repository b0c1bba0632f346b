"""`smpkprobes bench watchpoint`: what a hardware breakpoint costs.  A hit (a write to the
watched word, its handler empty) against a bare Unicorn memory hook on the same word, and
code that touches no watched byte with four breakpoints installed against none (the hooks
cover the watched bytes only: target <= 1.1x).  Wall-clock time, as in _bench."""

from __future__ import annotations

import time

import trio
import unicorn

from .._system import Machine
from ..hw_breakpoint._core import HwBreakpointAttr
from ._bench import _bare


def bench_watchpoint(arch: str = "x86_64", n: int = 20_000, repeat: int = 3) -> list[dict]:
    uc, ks, call, _ = _bare(arch)
    counter = ks.lookup("watched_counter").addr

    def bare_best() -> float:
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            call("fork_loop", n)
            best = min(best, time.perf_counter() - t)
        return best
    plain = bare_best()
    uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, lambda *a: None, None, counter, counter + 7)
    hook_cost = (bare_best() - plain) / n

    async def run():
        async with Machine(arch=arch, cpus=1, seed=1, trap_delay=0) as m:
            async def best(func):
                times = []
                for _ in range(repeat):
                    t = time.perf_counter()
                    await m.call(func, n, cpu=0)
                    times.append(time.perf_counter() - t)
                return min(times)
            hw, w = m.hw_breakpoints, m.backend.word_bytes
            base_fork, base_loop = await best("fork_loop"), await best("bench_loop")
            h = await hw.register_wide_hw_breakpoint(
                HwBreakpointAttr(bp_addr=counter, bp_len=w), lambda *a: None)
            hit = (await best("fork_loop") - base_fork) / n
            others = [await hw.register_wide_hw_breakpoint(
                HwBreakpointAttr(bp_addr=counter + 8 * i, bp_len=w), lambda *a: None)
                for i in range(1, 4)]
            loop4 = await best("bench_loop")
            for x in [h, *others]:
                await hw.unregister_wide_hw_breakpoint(x)
            base_loop = min(base_loop, await best("bench_loop"))
            return hit, loop4 / base_loop
    hit, ratio = trio.run(run)
    return [
        {"what": "bare UC_HOOK_MEM_WRITE callback on the word", "us": hook_cost * 1e6,
         "ratio": 1.0},
        {"what": "watchpoint hit, empty handler (x86: trap after the write)", "us": hit * 1e6,
         "ratio": hit / hook_cost},
        {"what": "bench_loop with 4 breakpoints installed elsewhere (time ratio)",
         "us": float("nan"), "ratio": ratio},
    ]


def print_watchpoint(rows: list[dict]) -> None:
    print("bench watchpoint: a hardware breakpoint on watched_counter (1 CPU)")
    print(f"  {'what':<62} {'us/hit':>8} {'ratio':>7}")
    for r in rows:
        us = "" if r["us"] != r["us"] else f"{r['us']:.2f}"
        print(f"  {r['what']:<62} {us:>8} {r['ratio']:>7.2f}")
    print("  target: unwatched code with four breakpoints installed <= 1.1x")

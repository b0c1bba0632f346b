"""`smpkprobes bench watchpoint`: what a hardware breakpoint costs.  A hit (a write to the
watched word, its handler empty) against a bare Unicorn memory hook on the same word, and
code that touches no watched byte with four breakpoints installed against none (the hooks
cover the watched bytes only: target <= 1.1x).  Measured in this process's CPU time
(time.process_time), which other processes on a shared host disturb less than wall time."""

from __future__ import annotations

import statistics
import time

import trio
import unicorn

from .._system import Machine
from ..hw_breakpoint._core import HwBreakpointAttr
from ._bench import _bare


def bench_watchpoint(arch: str = "x86_64", n: int = 20_000, repeat: int = 5) -> list[dict]:
    uc, ks, call, _ = _bare(arch)
    counter = ks.lookup("watched_counter").addr

    def bare_best() -> float:
        best = float("inf")
        for _ in range(repeat):
            t = time.process_time()
            call("fork_loop", n)
            best = min(best, time.process_time() - t)
        return best
    plain = bare_best()
    uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, lambda *a: None, None, counter, counter + 7)
    hook_cost = (bare_best() - plain) / n

    async def run():
        async with Machine(arch=arch, cpus=1, seed=1, trap_delay=0) as m:
            async def best(func, count):
                times = []
                for _ in range(repeat):
                    t = time.process_time()
                    await m.call(func, count, cpu=0)
                    times.append(time.process_time() - t)
                return min(times)
            hw, w = m.hw_breakpoints, m.backend.word_bytes
            base_fork = await best("fork_loop", n)
            h = await hw.register_wide_hw_breakpoint(
                HwBreakpointAttr(bp_addr=counter, bp_len=w), lambda *a: None)
            hit = (await best("fork_loop", n) - base_fork) / n
            await hw.unregister_wide_hw_breakpoint(h)
            # Unwatched code, with and without four breakpoints, in pairs: the host is noisy,
            # so each round compares its own two figures, and the median round is reported.
            ratios = []
            for _ in range(repeat):
                pair = []
                for k in (0, 4):
                    hs = [await hw.register_wide_hw_breakpoint(
                        HwBreakpointAttr(bp_addr=counter + 8 * i, bp_len=w), lambda *a: None)
                        for i in range(k)]
                    pair.append(await best("bench_loop", 10 * n))
                    for x in hs:
                        await hw.unregister_wide_hw_breakpoint(x)
                ratios.append(pair[1] / pair[0])
            return hit, statistics.median(ratios)
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

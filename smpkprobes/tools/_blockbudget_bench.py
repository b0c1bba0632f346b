"""The block budget's routes side by side, on one bare Unicorn instance each (the figures in
smpkprobes/machine/_blockbudget.py's docstring):

    python -m smpkprobes.tools._blockbudget_bench [ARCH ...]

bench_loop(n) runs with no block hook ("bare"), then with each way to charge a budget block
by block: the C callback ("c"), the Python twin ("python"), and a Python callback taking
the count from Unicorn's translation cache (`ctl_request_cache(addr).icount`, asked once
per block and kept: "request_cache").  The budget never runs out, so this is the cost of
counting alone.  Rounds are interleaved and each route keeps its best time, so that a
noisy host slows every route alike."""

from __future__ import annotations

import ctypes
import gc
import sys
import time

import unicorn
from unicorn.unicorn_py3.unicorn import HOOK_CODE_CFUNC, uc_hook_h, uclib

from ..cpus import get_backend
from ..machine import _blockbudget as bb
from ..machine import _memory as mem
from ..machine._kernel import IMAGES, Image
from ._bench import _bare, _insns_per_call

ROUTES = ("bare", "c", "request_cache", "python")
_HUGE = 1 << 62


def route(arch: str, name: str, n: int):
    """A bare instance with `name`'s block hook; returns once() -> (seconds, charged) for
    one call of bench_loop(n)."""
    uc, _ks, call, memory = _bare(arch)
    b = get_backend(arch)
    code = [r for r in memory.regions if r.perms & mem.X]
    starts = bb.InsnStarts(max(r.end for r in code), b.fixed_insn_len, b.insn_length)
    for r in code:
        starts.mark_executable(r.start, r.end)
    for addr, data, _memsz in Image.load(IMAGES / arch / "vmlinux").segments:
        if any(r.start <= addr < r.end for r in code):      # what Machine._load_image does
            starts.code_written(addr, data)
    ctx = bb.BudgetCtx(_HUGE, starts.address, starts.limit, starts.cache_address, bb._STOP)
    keep = [uc, starts, ctx]            # the callbacks read these: alive as long as once()

    def add(fptr, user):
        h = uc_hook_h()
        err = uclib.uc_hook_add(uc._uch, ctypes.byref(h), unicorn.UC_HOOK_BLOCK, fptr, user,
                                ctypes.c_uint64(1), ctypes.c_uint64(0))
        assert err == unicorn.UC_ERR_OK, err
        keep.append(fptr)

    if name == "c":
        if bb._blockbudget_native is None:
            return None
        add(ctypes.c_void_p(bb._blockbudget_native.CALLBACK),
            ctypes.cast(ctypes.byref(ctx), ctypes.c_void_p))
    elif name == "python":
        def hook(_uc, addr, size, _u):
            if ctx.budget <= 0:
                uclib.uc_emu_stop(uc._uch)
            else:
                ctx.budget -= starts.count(addr, size)
        add(HOOK_CODE_CFUNC(hook), ctypes.c_void_p(0))
    elif name == "request_cache":
        counts: dict[tuple[int, int], int] = {}

        def hook(_uc, addr, size, _u):
            if ctx.budget <= 0:
                uclib.uc_emu_stop(uc._uch)
                return
            k = counts.get((addr, size))
            if k is None:
                k = counts[(addr, size)] = uc.ctl_request_cache(addr)[1] or 1
            ctx.budget -= k
        add(HOOK_CODE_CFUNC(hook), ctypes.c_void_p(0))
    call("bench_loop", 100)             # translate once

    def once():
        before = ctx.budget
        t = time.perf_counter()
        call("bench_loop", n)
        dt = time.perf_counter() - t
        return dt, before - ctx.budget
    once.keep = keep
    return once


def measure(arch: str, n: int, rounds: int = 7, slow_rounds: int = 2) -> dict:
    """{route: (best seconds, instructions charged)} for bench_loop(n), plus "exact": the
    instructions it runs, counted one by one (a code hook)."""
    runs = {name: route(arch, name, n) for name in ROUTES}
    best, charged = {}, {}
    for rnd in range(rounds):
        for name, once in runs.items():
            if once is None or (name in ("python", "request_cache") and rnd >= slow_rounds):
                continue
            gc.collect()
            dt, ch = once()
            best[name] = min(best.get(name, dt), dt)
            charged[name] = ch
    out = {name: (best[name], charged[name] if name != "bare" else None) for name in best}
    out["exact"] = _insns_per_call(arch, "bench_loop", n)
    return out


def main(argv: list[str]) -> int:
    n = 200_000
    for arch in argv or ["x86_64", "arm64"]:
        res = measure(arch, n)
        exact = res.pop("exact")
        bare = res["bare"][0]
        print(f"{arch}: bench_loop({n}) = {exact} instructions; best of 7 interleaved rounds"
              " (2 for the Python callbacks)")
        for name, (dt, ch) in res.items():
            print(f"  {name:<14} {exact / dt / 1e6:7.1f} Minsn/s {dt / bare:7.2f}x bare time"
                  f"   charged {'-' if ch is None else ch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

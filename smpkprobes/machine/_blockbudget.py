"""How a quantum ends: an instruction budget counted in whole translation blocks.

Unicorn's own way to stop after N instructions (`emu_start(count=N)`) instruments every
instruction with a helper call; on the probe-free benchmark loop that alone caps a CPU at
about a third of the bare emulator's speed, before the machine has done anything.  So a CPU
counts its quantum at block starts instead:

  * a `UC_HOOK_BLOCK` callback runs before every translation block.  If the budget is
    already spent it stops the CPU there (the block does not run; the next quantum starts
    with it), otherwise it takes the block's instruction count off the budget.  A quantum
    therefore runs at least its budget and at most one block more, and where it stops
    depends only on the code and the budget: the seed still decides everything;
  * the instruction count of a block [addr, addr+size) is the number of instruction starts
    in it, read from `InsnStarts`, a byte per guest-physical address (1 where an
    instruction starts).  Fixed-width ISAs mark every aligned word of executable memory;
    variable-length ones (x86) mark what a linear decode of each piece of code written to
    executable memory finds (kernel image, modules, instruction slots).  A block the map
    knows nothing of still counts as one instruction, so a budget always runs out;
  * the callback is `block_budget()` in _blockbudget_native.c, a small C extension that
    setup.py builds where it can (`optional=True`: no C compiler or no Python headers is a
    warning, never a failed install), so a block costs no trip through Python.  Where it
    was not built, the same semantics run as a Python callback, the twin: identical runs,
    much slower.  `SMPKPROBES_BLOCK_HOOK=python` forces the twin; tests/test_blockbudget.py
    runs both on probed preemptive runs (x86_64, arm64, ppc) and compares them.

Why C (decided 2026-12-07; figures from a shared, noisy 2-core host, load average 9-20):
until then the callback was 111 bytes of hand-assembled x86-64 code in a page mapped
writable and executable, kept in lockstep with a listing and a ctypes struct, and every
other host ran the twin.  Three routes were measured against it.

  `python -m smpkprobes.tools._blockbudget_bench x86_64 arm64` (one bare Unicorn instance
  per route, bench_loop(200000), rounds interleaved, best of 7; time relative to no hook;
  every route charged exactly the instructions a code hook counts; the stub's column from
  the same script with commit 60e0d37's stub, mapped read+execute, added as a route).
  Range over separate runs (x86_64: 5, arm64: 2), the first run's figure in brackets:

      guest     stub (asm)          C callback          request_cache   Python twin
      x86_64    0.82-1.38x (1.38)   0.85-1.17x (1.17)   20.3-23.2x      28.5-40.2x
      arm64     0.81-1.14x (1.14)   1.02-1.16x (1.16)   18.7-22.0x      30.8-32.3x

  `smpkprobes bench machine --quick` (probe-free bench_loop on every CPU, x86_64 guest),
  the machine's speed as a share of the bare instance's, measured in the same run; two
  rounds of three runs back to back (the stub from commit 60e0d37, the twin forced with
  SMPKPROBES_BLOCK_HOOK=python):

      callback       1 CPU   2 CPUs   4 CPUs   8 CPUs
      stub (asm)     47.4%   41.1%    33.4%    29.4%     round 1
      C callback     48.1%   37.0%    54.0%    57.6%
      Python twin     5.2%    5.2%     4.8%     4.0%
      stub (asm)     53.4%   45.0%    55.5%    57.7%     round 2
      C callback     69.0%   49.6%    48.6%    44.2%
      Python twin     4.3%    4.0%     4.2%     3.6%

  On this host the stub and the C callback cannot be told apart (gcc -O3 compiles the same
  dozen-instruction fast path); the twin's tenfold loss can.

  * (a) the C callback costs what the stub costs, within this host's noise.  It is plain
    C that any compiler checks, runs on every host the extension builds on (arm64 hosts
    had only the twin), and the dynamic loader maps it read+execute: no writable code
    page, no listing to keep in step, no calling convention written out by hand.  The
    price: a host with no C compiler or no Python headers at install time gets the twin.
    `hook_route()` says which one a CPU gets;
  * (b) Unicorn's own facilities do not remove the per-block callback, only the count's
    source.  `ctl_request_cache(addr)` gives a block's instruction count (charged, it
    gives the same totals as InsnStarts above), but asking it once per block from Python,
    cached, still costs a Python callback per block (19-23x).  Called from the C callback
    on a cache miss it would replace only InsnStarts, at the price of asking QEMU's
    translator for a block from inside a block hook (uc_ctl is variadic and documents no
    such use) instead of reading a table the tests compare with the decoder: not taken.
    The block hook that carries the count (UC_HOOK_BLOCK_ICOUNT, unicorn-engine/unicorn
    pull request 2378, merged 2026-08) is in no Unicorn release this project allows
    (2.1.x); with it, the count could come from Unicorn and only the callback remain;
  * (c) the Python twin is the reference semantics and the fallback: identical runs,
    28-40x the bare time on this loop (about 4 instructions per block).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Callable

import unicorn
from unicorn.unicorn_py3.unicorn import HOOK_CODE_CFUNC, uclib

try:
    from . import _blockbudget_native
except ImportError:         # not built here (no C compiler or no Python headers at install)
    _blockbudget_native = None

# A translation block spans at most two pages: this much of the tables past their limit
# keeps a block that starts just below it inside them, and this much below a write is
# where a block that overlaps the write may start.
_PAD = 0x2000

_STOP = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value


class BudgetCtx(ctypes.Structure):
    """The C callback's user_data: `budget_ctx` in _blockbudget_native.c, field for field."""

    _fields_ = [("budget", ctypes.c_int64),     # instructions left; <= 0: stop
                ("starts", ctypes.c_void_p),    # InsnStarts' byte per address
                ("limit", ctypes.c_uint64),     # blocks at or past this count 1
                ("cache", ctypes.c_void_p),     # u32 per address: size | count << 16
                ("stop", ctypes.c_void_p)]      # uc_emu_stop


def hook_route() -> str:
    """Which block callback a CPU made now gets: "c" (the extension) or "python" (the
    twin: where the extension was not built, or `SMPKPROBES_BLOCK_HOOK=python`)."""
    if _blockbudget_native is None or os.environ.get("SMPKPROBES_BLOCK_HOOK") == "python":
        return "python"
    return "c"


class InsnStarts:
    """One byte per guest-physical address below `limit` (the end of executable memory):
    1 where an instruction starts; and the C callback's cache of block counts."""

    def __init__(self, limit: int, fixed_len: int,
                 insn_length: Callable[[bytes, int], int | None]):
        self.limit = limit
        # Anonymous mappings: the pages of addresses no code lives at are never touched.
        self._mm = mmap.mmap(-1, limit + _PAD)
        self._cache = mmap.mmap(-1, 4 * (limit + _PAD))
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))
        self.cache_address = ctypes.addressof(ctypes.c_char.from_buffer(self._cache))
        self._fixed = fixed_len
        self._insn_length = insn_length

    def mark_executable(self, start: int, end: int) -> None:
        """A fixed-width ISA: every aligned word of [start, end) starts an instruction."""
        if self._fixed:
            n = (end - start) // self._fixed
            pattern = b"\x01" + b"\x00" * (self._fixed - 1)
            self._mm[start:start + n * self._fixed] = pattern * n

    def code_written(self, addr: int, data: bytes) -> None:
        """`data` was written at `addr`, an instruction start.  Decode it linearly
        (variable-length ISAs; fixed-width ones were marked once and for all), and forget
        the counts of blocks that may overlap it (a block spans at most two pages)."""
        if not data or addr >= self.limit:
            return
        end = min(addr + len(data), self.limit)
        lo = max(0, addr - _PAD)
        self._cache[4 * lo:4 * end] = bytes(4 * (end - lo))
        if self._fixed:
            return
        marks = bytearray(end - addr)
        i = 0
        while i < len(marks):
            marks[i] = 1
            n = self._insn_length(data[i:], addr + i)
            i += n if n else 1
        self._mm[addr:end] = marks

    def count(self, addr: int, size: int) -> int:
        """The instructions a block [addr, addr+size) counts for (what the C callback computes)."""
        if addr >= self.limit or not size:
            return 1
        return self._mm[addr:addr + size].count(1) or 1


class BlockBudget:
    """One CPU's block-counted budget: the callback and its context."""

    def __init__(self, starts: InsnStarts):
        self.ctx = BudgetCtx(0, starts.address, starts.limit, starts.cache_address, _STOP)
        self._ctx_ref = ctypes.byref(self.ctx)
        self._starts = starts
        self.route = hook_route()

    def install(self, uch, raw_hook: Callable) -> None:
        """Add the block hook to the Unicorn instance `uch` with `raw_hook(type, fptr,
        user_data)`."""
        if self.route == "c":
            raw_hook(unicorn.UC_HOOK_BLOCK, ctypes.c_void_p(_blockbudget_native.CALLBACK),
                     ctypes.cast(self._ctx_ref, ctypes.c_void_p))
        else:
            self._uch = uch
            self._cb = HOOK_CODE_CFUNC(self._python_hook)
            raw_hook(unicorn.UC_HOOK_BLOCK, self._cb, ctypes.c_void_p(0))

    def _python_hook(self, _uc, addr, size, _user):
        # block_budget() of _blockbudget_native.c, in Python.
        ctx = self.ctx
        if ctx.budget <= 0:
            uclib.uc_emu_stop(self._uch)
        else:
            ctx.budget -= self._starts.count(addr, size)

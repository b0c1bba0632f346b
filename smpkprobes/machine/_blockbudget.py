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
  * the callback itself is 111 bytes (35 instructions) of x86-64 machine code (`_STUB`,
    listed below) in an executable page, so a block costs no trip through Python.  On a host where that
    cannot work (not x86-64 System V, or no executable mapping allowed) the same
    semantics run as a Python callback - slower, identical runs.  `SMPKPROBES_BLOCK_HOOK=
    python` forces that.

Measured on the probe-free bench_loop (one CPU, one emu_start): bare Unicorn 216 Minsn/s,
with the native block budget 201 Minsn/s; with `count`, about 65 Minsn/s.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys
from typing import Callable

import unicorn
from unicorn.unicorn_py3.unicorn import uclib

# A translation block spans at most two pages: this much of the tables past their limit
# keeps a block that starts just below it inside them, and this much below a write is
# where a block that overlaps the write may start.
_PAD = 0x2000


class BudgetCtx(ctypes.Structure):
    """What the native callback gets as user_data (offsets are in `_STUB`)."""

    _fields_ = [("budget", ctypes.c_int64),     # +0: instructions left; <= 0: stop
                ("starts", ctypes.c_void_p),    # +8: InsnStarts' byte per address
                ("limit", ctypes.c_uint64),     # +16: blocks at or past this count 1
                ("cache", ctypes.c_void_p)]     # +24: u32 per address: size | count << 16


def _assemble(items, stop_target: int) -> bytes:
    """A two-pass assembler for the stub: bytes, labels, and short jumps to labels."""
    def layout():
        pos, labels = 0, {}
        for it in items:
            if isinstance(it, str):
                labels[it] = pos
            elif isinstance(it, tuple):
                pos += 2
            else:
                pos += len(it)
        return labels
    labels = layout()
    out = bytearray()
    for it in items:
        if isinstance(it, str):
            continue
        if isinstance(it, tuple):
            opcode, label = it
            rel = labels[label] - (len(out) + 2)
            assert -128 <= rel <= 127
            out += bytes([opcode, rel & 0xFF])
        else:
            out += it
    out += b"\x48\xb8" + stop_target.to_bytes(8, "little")     # movabs rax, uc_emu_stop
    out += b"\xff\xe0"                                          # jmp rax (tail call)
    return bytes(out)


JLE, JAE, JE, JNE, JMP = 0x7E, 0x73, 0x74, 0x75, 0xEB

# void cb(uc_engine *uc /*rdi*/, uint64_t addr /*rsi*/, uint32_t size /*edx*/,
#         BudgetCtx *ctx /*rcx*/)
# A block's count is cached per start address with the size it was counted for; a block
# seen before (the common case: loops) costs a dozen instructions, a new one a loop over
# its bytes.  InsnStarts.code_written drops the cached counts that a write can change.
_STUB = [
    bytes.fromhex("48833900"),      # cmp qword [rcx], 0          budget spent?
    (JLE, "stop"),
    bytes.fromhex("85d2"),          # test edx, edx
    (JE, "one"),
    bytes.fromhex("483b7110"),      # cmp rsi, [rcx+16]           addr past the tables?
    (JAE, "one"),
    bytes.fromhex("4c8b5118"),      # mov r10, [rcx+24]
    bytes.fromhex("418b04b2"),      # mov eax, [r10+rsi*4]        cached size | count << 16
    bytes.fromhex("6639d0"),        # cmp ax, dx
    (JNE, "count"),
    bytes.fromhex("c1e810"),        # shr eax, 16
    (JMP, "take"),
    "count",
    bytes.fromhex("4c8b4108"),      # mov r8, [rcx+8]
    bytes.fromhex("4901f0"),        # add r8, rsi                 r8 = &starts[addr]
    bytes.fromhex("31c0"),          # xor eax, eax
    bytes.fromhex("4189d3"),        # mov r11d, edx
    "loop",
    bytes.fromhex("450fb608"),      # movzx r9d, byte [r8]
    bytes.fromhex("4401c8"),        # add eax, r9d
    bytes.fromhex("49ffc0"),        # inc r8
    bytes.fromhex("41ffcb"),        # dec r11d
    (JNE, "loop"),
    bytes.fromhex("85c0"),          # test eax, eax
    (JNE, "store"),
    bytes.fromhex("b801000000"),    # mov eax, 1                  at least one instruction
    "store",
    bytes.fromhex("4189c1"),        # mov r9d, eax
    bytes.fromhex("41c1e110"),      # shl r9d, 16
    bytes.fromhex("440fb7da"),      # movzx r11d, dx
    bytes.fromhex("4509d9"),        # or r9d, r11d
    bytes.fromhex("45890cb2"),      # mov [r10+rsi*4], r9d
    (JMP, "take"),
    "one",
    bytes.fromhex("b801000000"),    # mov eax, 1
    "take",
    bytes.fromhex("482901"),        # sub [rcx], rax
    bytes.fromhex("c3"),            # ret
    "stop",                         # movabs rax, uc_emu_stop; jmp rax  (appended)
]

# What the stub disassembles to (tests/test_machine.py checks it with capstone).
STUB_LISTING = (
    "cmp qword ptr [rcx], 0", "jle", "test edx, edx", "je", "cmp rsi, qword ptr [rcx + 0x10]",
    "jae", "mov r10, qword ptr [rcx + 0x18]", "mov eax, dword ptr [r10 + rsi*4]",
    "cmp ax, dx", "jne", "shr eax, 0x10", "jmp",
    "mov r8, qword ptr [rcx + 8]", "add r8, rsi", "xor eax, eax", "mov r11d, edx",
    "movzx r9d, byte ptr [r8]", "add eax, r9d", "inc r8", "dec r11d", "jne",
    "test eax, eax", "jne", "mov eax, 1",
    "mov r9d, eax", "shl r9d, 0x10", "movzx r11d, dx", "or r9d, r11d",
    "mov dword ptr [r10 + rsi*4], r9d", "jmp",
    "mov eax, 1", "sub qword ptr [rcx], rax", "ret",
    "movabs rax", "jmp rax",
)

_native: tuple[int, mmap.mmap, bytes] | None | bool = False      # False: not tried yet


def native_stub() -> tuple[int, bytes] | None:
    """(address, code) of the native block callback, made once per process; None where it
    cannot run here."""
    global _native
    if _native is False:
        _native = _make_native()
    return None if _native is None else (_native[0], _native[2])


def _make_native():
    if os.environ.get("SMPKPROBES_BLOCK_HOOK", "native") == "python":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform == "win32" \
            or sys.maxsize < 2 ** 32:
        return None     # the stub is x86-64 System V code
    stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
    code = _assemble(_STUB, stop)
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, AttributeError, ValueError):
        return None     # W^X policy: fall back to Python
    page.write(code)
    return ctypes.addressof(ctypes.c_char.from_buffer(page)), page, code


class InsnStarts:
    """One byte per guest-physical address below `limit` (the end of executable memory):
    1 where an instruction starts; and the stub's cache of block counts."""

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
        """The instructions a block [addr, addr+size) counts for (what the stub computes)."""
        if addr >= self.limit or not size:
            return 1
        return self._mm[addr:addr + size].count(1) or 1


class BlockBudget:
    """One CPU's block-counted budget: the callback and its context."""

    def __init__(self, starts: InsnStarts):
        self.ctx = BudgetCtx(0, starts.address, starts.limit, starts.cache_address)
        self._ctx_ref = ctypes.byref(self.ctx)
        self._starts = starts

    def install(self, uch, raw_hook: Callable) -> None:
        """Add the block hook to the Unicorn instance `uch` with `raw_hook(type, fptr,
        user_data)`."""
        stub = native_stub()
        if stub is not None:
            raw_hook(unicorn.UC_HOOK_BLOCK, ctypes.c_void_p(stub[0]),
                     ctypes.cast(self._ctx_ref, ctypes.c_void_p))
        else:
            from unicorn.unicorn_py3.unicorn import HOOK_CODE_CFUNC
            self._uch = uch
            self._cb = HOOK_CODE_CFUNC(self._python_hook)
            raw_hook(unicorn.UC_HOOK_BLOCK, self._cb, ctypes.c_void_p(0))

    def _python_hook(self, _uc, addr, size, _user):
        # The stub's semantics, in Python.
        ctx = self.ctx
        if ctx.budget <= 0:
            uclib.uc_emu_stop(self._uch)
        else:
            ctx.budget -= self._starts.count(addr, size)

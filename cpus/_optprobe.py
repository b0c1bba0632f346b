"""Jump optimization (optprobes) as per-architecture facts.

An optimized kprobe replaces its breakpoint with a branch to a *detour buffer*, so a hit
costs no trap (Linux Documentation/trace/kprobes.rst, "How Does Jump Optimization Work?").
What differs per architecture is data:

  * `jump_len` - how many bytes the branch written over the probe takes.  On x86 that is
    `jmp rel32`, five bytes, so the branch covers the probed instruction *and* those after
    it up to five bytes: the optimized region is several whole instructions
    (arch/x86/kernel/kprobes/opt.c).  On arm and ppc the branch is one instruction, as long
    as the probed one: the region is that instruction alone (arch/arm/probes/kprobes/
    opt-arm.c, arch/powerpc/kernel/optprobes.c);
  * `reach` - how far the branch reaches, either way (`jmp rel32` 2 GiB, arm `b` and ppc
    `b` 32 MiB): the detour buffer must lie within it, and so must the jump back;
  * `scan_function` - whether the whole function must be decoded to prove that no jump
    lands inside the region and that no indirect jump could.  Only a region of several
    instructions has an inside; the kernels of the single-branch arches do not scan
    (opt-arm.c's `arch_check_optimized_kprobe` has nothing to check), and neither do we;
  * `encode_jump(src, dst)` - the branch itself.

An architecture without these facts stays trap-based, and `NO_OPTPROBES` says why.  The
facts also decide the kretprobe trampoline: where they exist (x86_64, i386, arm, ppc) and
optimization is on, the trampoline is entered through a code hook and takes no trap (x86's,
arm's are code in Linux, ppc's is a kprobe its optprobes may optimize); on arm64 and sparc64
its breakpoint traps, as every other probe there does.

The detour buffer, per optimized probe (`DetourLayout`):

    stub   (one instruction, in the stub area):  jump to the buffer
    buffer (in the buffer area):  the region's instructions, copied and fixed up for where
                                  they now run; then a jump back to the end of the region

The probe core hooks the stub area with one code hook per CPU: the stub's single
instruction is where the pre_handlers run, as a bare code hook and not a trap, and the PC is
never written - the stub's own jump carries the CPU on into the copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ._base import CpuBackend


@dataclass(frozen=True)
class OptFacts:
    """What jump optimization needs to know about one architecture."""

    jump_len: int
    reach: int                     # the branch reaches [src - reach, src + reach)
    scan_function: bool
    encode_jump: Callable[[int, int], bytes]
    # Bytes of one stub and of one buffer in the detour areas (a buffer holds the copied
    # region, at most jump_len + max_insn_len - 1 bytes, and the jump back).
    stub_size: int
    buffer_size: int

    def in_reach(self, src: int, dst: int) -> bool:
        return -self.reach <= dst - src < self.reach


def _x86_jmp_rel32(src: int, dst: int) -> bytes:
    return b"\xe9" + (dst - (src + 5)).to_bytes(4, "little", signed=True)


def _arm_b(src: int, dst: int) -> bytes:
    off = dst - (src + 8)                      # pc reads as the instruction + 8
    return (0xEA000000 | ((off >> 2) & 0xFFFFFF)).to_bytes(4, "little")


def _ppc_b(src: int, dst: int) -> bytes:
    return ((18 << 26) | ((dst - src) & 0x03FFFFFC)).to_bytes(4, "big")


_X86 = OptFacts(jump_len=5, reach=1 << 31, scan_function=True, encode_jump=_x86_jmp_rel32,
                stub_size=8, buffer_size=32)
_FACTS: dict[str, OptFacts] = {
    "x86_64": _X86,
    "i386": _X86,
    "arm": OptFacts(jump_len=4, reach=1 << 25, scan_function=False, encode_jump=_arm_b,
                    stub_size=4, buffer_size=8),
    "ppc": OptFacts(jump_len=4, reach=1 << 25, scan_function=False, encode_jump=_ppc_b,
                    stub_size=4, buffer_size=8),
}

NO_OPTPROBES: dict[str, str] = {
    "arm64": "Linux has no optprobes on arm64: its kprobes always take a BRK and single-step "
             "or simulate (arch/arm64/kernel/probes/); a `b` would reach, but no kernel "
             "writes one, so neither do we",
    "sparc64": "Linux has no optprobes on sparc64: a branch written over an instruction "
               "would need a delay slot, i.e. a second instruction patched while other CPUs "
               "may be executing it, which the single-instruction protocol cannot do safely",
}


def opt_facts(backend: CpuBackend) -> OptFacts | None:
    """The optprobe facts of `backend`, or None when it stays trap-based (see
    `NO_OPTPROBES`)."""
    return _FACTS.get(backend.name)


@dataclass(frozen=True)
class DetourLayout:
    """Where a detour lives and what it holds (see the module docstring)."""

    stub: int
    buffer: int
    stub_code: bytes
    buffer_code: bytes


def detour_layout(backend: CpuBackend, facts: OptFacts, plans, stub: int,
                  buffer: int) -> DetourLayout:
    """The stub and the buffer for the region stepped by `plans` (InsnPlans of consecutive
    instructions, the probed one first): each copy fixed up for its place in the buffer (the
    same fixups the single-step path makes), then the jump back."""
    code = bytearray()
    for plan in plans:
        code += backend.slot_code(plan, buffer + len(code), boost=False)[:plan.length]
    end = plans[-1].addr + plans[-1].length
    code += facts.encode_jump(buffer + len(code), end)
    if len(code) > facts.buffer_size:
        raise ValueError(f"detour of {len(code)} bytes exceeds {facts.buffer_size}")
    return DetourLayout(stub, buffer, facts.encode_jump(stub, buffer), bytes(code))

"""Whether a probe may be jump-optimized: the kernel's safety checks, in order.

A kprobe is optimized only when replacing its breakpoint by a branch to a detour buffer
cannot change what any CPU executes (Documentation/trace/kprobes.rst, "Safety Check";
arch/x86/kernel/kprobes/opt.c `can_optimize`, kernel/kprobes.c `optimize_kprobe`):

  1. the optimized region - the whole instructions the branch covers - lies within one
     function;
  2. no jump anywhere in that function lands inside the region, except on its first byte
     (the whole function is decoded);
  3. the function has no indirect jump, which might land there;
  4. every instruction of the region can run out of line, with the fixups the single-step
     path already makes (a copy that ends in a jump back: a boostable one);
  5. and, for the probe as it stands now: no post_handler, not disabled, no jprobe, and no
     other probe inside the region (`site_blockers`).

Checks 1-4 are facts of the text and are computed once per address (`prepare_region`);
check 5 changes as probes come and go, so the optimizer asks it every time.  Checks 2 and 3
only mean something for a region of several instructions (`OptFacts.scan_function`).
"""

from __future__ import annotations

from typing import Callable

import capstone

from smpkprobes.cpus import CpuBackend, InsnPlan, StepKind, UnsteppableError
from smpkprobes.cpus._optprobe import OptFacts

from ._probes import KPROBE_FLAG_DISABLED


class NotOptimizable(Exception):
    """The region fails a safety check; `reason` says which."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def prepare_region(backend: CpuBackend, facts: OptFacts, text: Callable[[int, int], bytes],
                   func: int, func_size: int, addr: int) -> tuple[InsnPlan, ...]:
    """Checks 1-4 for a probe at `addr` in the function [func, func + func_size), reading
    original text (no breakpoints) through `text(addr, size)`.  Returns the plans of the
    region's instructions, the probed one first; raises NotOptimizable."""
    end = func + func_size
    # 1. The region: whole instructions from addr until the branch fits.
    lengths = []
    covered = 0
    while covered < facts.jump_len:
        a = addr + covered
        size = backend.insn_length(text(a, backend.max_insn_len), a) if a < end else None
        if size is None or a + size > end:
            raise NotOptimizable(f"the region of {facts.jump_len} bytes at {addr:#x} runs past "
                                 f"the end of its function")
        lengths.append(size)
        covered += size
    region_end = addr + covered
    if facts.scan_function and len(lengths) > 1:
        _scan(backend, text(func, func_size), func, addr, region_end)
    # 4. Every instruction of the region runs out of line, with a jump back.
    plans = []
    a = addr
    for size in lengths:
        try:
            plan = backend.plan_insn(text(a, backend.max_insn_len), a)
        except UnsteppableError as err:
            raise NotOptimizable(f"{a:#x} cannot run out of line: {err.reason}") from None
        if plan.kind is not StepKind.OUT_OF_LINE or not plan.boostable:
            raise NotOptimizable(f"{a:#x} ({plan.mnemonic}) cannot run out of line with a "
                                 f"jump back")
        plans.append(plan)
        a += size
    return tuple(plans)


def _scan(backend: CpuBackend, code: bytes, func: int, addr: int, region_end: int) -> None:
    """Checks 2 and 3: decode the whole function."""
    cs = backend.disassembler()
    off = 0
    while off < len(code):
        insn = next(cs.disasm(code[off:off + backend.max_insn_len], func + off, 1), None)
        if insn is None:
            raise NotOptimizable(f"the function does not decode at {func + off:#x}")
        off += insn.size
        if not insn.group(capstone.CS_GRP_JUMP):
            continue
        ops = insn.operands
        if not ops or ops[0].type != capstone.CS_OP_IMM or insn.mnemonic == "ljmp":
            raise NotOptimizable(f"the function has an indirect jump at {insn.address:#x} "
                                 f"({insn.mnemonic} {insn.op_str})")
        target = ops[0].imm & backend.word_mask
        if addr < target < region_end:
            raise NotOptimizable(f"the jump at {insn.address:#x} lands inside the region, "
                                 f"at {target:#x}")


def site_blockers(site, region_end: int, probed: Callable[[int, int], bool]) -> str | None:
    """Check 5 for the aggregate `site` whose region ends at `region_end`: why it may not
    be optimized now, or None.  `probed(lo, hi)` tells whether another probe lies in
    [lo, hi)."""
    live = [c for c in site.children if not c.flags & KPROBE_FLAG_DISABLED]
    if not live:
        return "disabled"
    for c in live:
        if c.post_handler is not None:
            return "has a post_handler"
        if c._type == "j":
            return "is a jprobe"
    if probed(site.addr + 1, region_end):
        return "another probe lies inside the region"
    return None

"""sparc64: SPARC V9, 64-bit ABI, big-endian.  `ta 0x70` breakpoints, register windows,
delay slots, the stack bias.

How Unicorn runs it (its CPU state reached directly, the register windows spilled and
filled by the backend as firmware, a stop in a delay slot resumed through a trampoline):
cpus/_unicorn_sparc64.py.

Calling convention (SPARC V9 64-bit ABI): arguments in %o0-%o5 (%i0-%i5 after `save`),
the 7th on at %sp + 2047 + 176 (16-word window save area, 6 argument home words), result
in %o0.  `call` leaves its own address in %o7 and a function returns to %o7 + 8; this
port's return addresses are those resume addresses (ri.ret_addr, stack traces), so a
kretprobe stores `kretprobe_trampoline - 8` in %o7.

Stepping strategy (Linux arch/sparc/kernel/kprobes.c steps one instruction out of line
with TNPC pointing at a second breakpoint and fixes branches up afterwards; Unicorn has no
writable nPC, so here a control transfer is stepped together with its delay slot):
  * ordinary instructions are copied into a slot followed by the breakpoint, or, boosted,
    by `ba,a` back to the next instruction;
  * `call`, `jmpl` (ret/retl/indirect calls), `rd %pc` and unconditional or never-taken
    branches whose delay slot is a nop are simulated;
  * a conditional branch (Bicc, BPcc, BPr, FBfcc, FBPfcc) is copied with its delay slot
    and re-targeted inside the slot: it ends on one of two breakpoints, not taken
    (resume after the delay slot) or taken (resume at the target), so the condition
    codes, which Unicorn does not expose, are evaluated by the CPU itself;
  * an instruction in a delay slot is refused (EINVAL): it executes as part of its
    branch's step, and a trap there would lose nPC;
  * `ta`/`tcc`, `illtrap`, `done`/`retry`, `return`, and control transfers whose delay
    slot is not a plain instruction (or, for call/jmpl, not a nop) are refused
    (EOPNOTSUPP).
"""

from __future__ import annotations

from dataclasses import dataclass

import capstone

from ._base import (EINVAL, EOPNOTSUPP, CallingConvention, CpuBackend, InsnPlan, RegAccess,
                    Register, StepKind, UnsteppableError)
from ._sparc64_insn import (_MASK, _REGNAMES, BIAS, BREAKPOINT, FRAME_MIN, NOP, _annul,
                            _ba_a, _branch_disp, _branch_kind, _delay_slot_runs, _imm,
                            _is_restore, _op, _op2, _op3, _rd, _rs1, _rs2, _sext, _simm13,
                            _unfit_for_delay_slot, _with_disp, is_delayed_cti)
from ._unicorn_sparc64 import SPARC64 as _UNICORN

ARG_REGS = ("o0", "o1", "o2", "o3", "o4", "o5")

# r0..r31 of the current window, %pc, the condition codes (xcc << 4 | icc, V9's %ccr) and %y.
# A kprobe_events fetch-arg also takes the kernel's names (arch/sparc/kernel/ptrace_64.c
# regoffset_table) where they do not clash: lr for %o7 (the kernel's I7 is the trapped
# window's %o7).  The kernel's i0..i7 are the trapped window's *outs* (its trap entry's
# `save` made them ins); here %i0..%i7 name the current window's ins, as the ISA does.  The
# kernel's npc and tstate are not modelled.
_ALIASES = {"o6": ("sp",), "o7": ("lr",)}
REGISTERS = (
    *(Register(n, 8, _ALIASES.get(n, ()), general_purpose=True, argument=n in ARG_REGS)
      for n in _REGNAMES),
    Register("pc", 8, ("ip",)),
    Register("ccr", 8, ("flags",)),
    Register("y", 8),
)

# do_sparc64_fault: kprobe_page_fault(regs, 0).
PAGE_FAULT_TRAPNR = 0


# == the calling convention ================================================================
@dataclass(frozen=True)
class Sparc64CallingConvention(CallingConvention):
    """SPARC V9 64-bit: %sp is biased by 2047; a return address is %o7 + 8."""

    def _stack(self, regs: RegAccess) -> int:
        return (regs.read(self.sp_reg) + BIAS) & _MASK

    def _arg_slot(self, regs: RegAccess, n: int) -> int:
        return self._stack(regs) + self.stack_args_offset + (n - len(self.arg_regs)) * 8

    def arg(self, regs: RegAccess, n: int) -> int:
        if n < len(self.arg_regs):
            return regs.read(self.arg_regs[n])
        return regs.read_word(self._arg_slot(regs, n))

    def set_arg(self, regs: RegAccess, n: int, value: int) -> None:
        if n < len(self.arg_regs):
            regs.write(self.arg_regs[n], value)
        else:
            regs.write_word(self._arg_slot(regs, n), value)

    def get_return_address(self, regs: RegAccess) -> int:
        return (regs.read("o7") + 8) & _MASK

    def set_return_address(self, regs: RegAccess, value: int) -> None:
        regs.write("o7", value - 8)

    def emulate_return(self, regs: RegAccess, value: int | None = None) -> int:
        """`retl` of a leaf (the hypercall stubs run in their caller's window)."""
        if value is not None:
            regs.write(self.ret_reg, value)
        target = self.get_return_address(regs)
        regs.write(self.pc_reg, target)
        return target

    def setup_call(self, regs: RegAccess, stack_top: int, func: int, args: tuple[int, ...],
                   return_to: int) -> None:
        """A frame below `stack_top` with room for the callee's window save area, the
        argument home words and the stack arguments; its save area is zeroed so that a
        stack walk ends there (saved %i6 = %i7 = 0)."""
        stack = args[len(self.arg_regs):]
        sp = (stack_top - FRAME_MIN - 8 * len(stack)) & ~(self.stack_align - 1)
        for k in range(16):
            regs.write_word(sp + 8 * k, 0)
        for i, a in enumerate(stack):
            regs.write_word(sp + self.stack_args_offset + 8 * i, a & _MASK)
        for reg, a in zip(self.arg_regs, args):
            regs.write(reg, a & _MASK)
        regs.write(self.sp_reg, sp - BIAS)
        regs.write("o7", return_to - 8)
        regs.write(self.pc_reg, func)

    def stack_window(self, regs: RegAccess, arg_bytes: int) -> tuple[int, int]:
        """From the real stack pointer through the save area, the home words and
        `arg_bytes` of stack arguments."""
        return self._stack(regs), self.stack_args_offset + arg_bytes


# == the backend ===========================================================================
class Sparc64(CpuBackend):
    def __init__(self):
        super().__init__(
            name="sparc64", bits=64, endian="big",
            cs_arch=capstone.CS_ARCH_SPARC,
            cs_mode=capstone.CS_MODE_V9 | capstone.CS_MODE_BIG_ENDIAN,
            breakpoint=BREAKPOINT.to_bytes(4, "big"),
            register_file=REGISTERS,
            cc=Sparc64CallingConvention(word_bytes=8, arg_regs=ARG_REGS,
                                        ret_reg="o0", sp_reg="o6", pc_reg="pc",
                                        return_address_reg="o7", stack_args_offset=FRAME_MIN,
                                        stack_align=16,
                                        # Six integer argument registers.
                                        default_arg_count=6),
            unicorn=_UNICORN,
            page_fault_trapnr=PAGE_FAULT_TRAPNR,
            # regs.flags is %ccr (served by the Unicorn quirks: see read_special there).
            flags_reg="ccr", fp_reg="i6",
            # A control transfer is planned together with its delay slot.
            max_insn_len=8, fixed_insn_len=4, slot_size=64,
            # The window save area of the frame at (real) address fp: %i6 at +112,
            # %i7 at +120 (see unwind_frame).
            frame_saved_fp_offset=14 * 8, frame_ret_offset=15 * 8,
        )

    # -- stack frames --------------------------------------------------------------------------
    def frame_start(self, cpu, regs) -> int:
        """Frame records live in register windows: flush them to their save areas (flushw,
        and the current window too), then start at the current frame's real %sp."""
        self.unicorn.flush_windows(cpu)
        return (cpu.reg_read("o6") + BIAS) & _MASK

    def unwind_frame(self, read_word, fp: int) -> tuple[int, int]:
        """The frame whose window save area is at `fp`: its saved %i7 (the call that made
        it; the return address is 8 past it) and %i6 (the caller's biased %sp)."""
        i7 = read_word(fp + self.frame_ret_offset)
        i6 = read_word(fp + self.frame_saved_fp_offset)
        if i7 == 0:
            return 0, 0
        return (i7 + 8) & _MASK, (i6 + BIAS) & _MASK if i6 else 0

    def frame_pending(self, code: bytes) -> bool:
        """At the entry `save` the window is still the caller's, and after the closing
        `restore` (at its `retl`, and in that one's delay slot) it is the caller's again:
        the return address is then %o7 + 8."""
        if not code:
            return True
        last = [int.from_bytes(code[i:i + 4], "big")
                for i in range(max(0, len(code) - 8), len(code), 4)]
        return _is_restore(last[-1]) or (len(last) == 2 and _is_restore(last[0])
                                         and _op(last[1]) == 2 and _op3(last[1]) == 0x38)

    # -- stepping ------------------------------------------------------------------------------
    def plan_probe(self, text, addr: int) -> InsnPlan:
        prev = int.from_bytes(text(addr - 4, 4), "big")
        if is_delayed_cti(prev) and _delay_slot_runs(prev):
            raise UnsteppableError(
                EINVAL, f"{addr:#x} is the delay slot of `{self._mnemonic(prev, addr - 4)}`: "
                        f"it executes as part of that instruction's step (probe the branch)")
        return self.plan_insn(text(addr, self.max_insn_len), addr)

    def plan_insn(self, code: bytes, addr: int) -> InsnPlan:
        if len(code) < 4 or addr & 3:
            raise UnsteppableError(EINVAL, "instructions are 4 bytes, 4-byte aligned")
        w = int.from_bytes(code[:4], "big")
        mnem = self._mnemonic(w, addr)
        base = dict(addr=addr, orig=code[:4], mnemonic=mnem)
        op = _op(w)
        if op == 0 and _op2(w) in (0, 7):
            raise UnsteppableError(EOPNOTSUPP, f"{mnem}: illegal instruction")
        if op == 2:
            op3 = _op3(w)
            if op3 == 0x3A:
                raise UnsteppableError(EOPNOTSUPP, f"{mnem}: trap instruction (the kprobes "
                                                   f"breakpoint is `ta 0x70`)")
            if op3 == 0x3E:
                raise UnsteppableError(EOPNOTSUPP, f"{mnem}: return from trap")
            if op3 == 0x39:
                raise UnsteppableError(EOPNOTSUPP, f"{mnem}: `return` restores a window and "
                                                   f"jumps; it is not stepped")
            if op3 == 0x28 and _rs1(w) == 5:                 # rd %pc, %rd
                rd = _REGNAMES[_rd(w)]
                return InsnPlan(kind=StepKind.SIMULATE, length=4,
                                simulate=self._sim_rdpc(addr, rd), **base)
        if not is_delayed_cti(w):
            return InsnPlan(kind=StepKind.OUT_OF_LINE, length=4, boostable=True,
                            fixup=("copy",), **base)
        return self._plan_cti(w, code, addr, mnem)

    def _plan_cti(self, w: int, code: bytes, addr: int, mnem: str) -> InsnPlan:
        if len(code) < 8:
            raise UnsteppableError(EINVAL, f"{mnem}: its delay slot is not text")
        delay = int.from_bytes(code[4:8], "big")
        base = dict(addr=addr, orig=code[:8], mnemonic=mnem, length=8)
        why = None if delay == NOP else _unfit_for_delay_slot(delay)
        if why is not None:
            raise UnsteppableError(EOPNOTSUPP, f"{mnem}: its delay slot holds {why}")
        nxt = addr + 8
        if _op(w) == 1:                                      # call disp30
            target = (addr + _sext(w, 30) * 4) & _MASK
            if delay != NOP:
                raise UnsteppableError(EOPNOTSUPP, f"{mnem}: a call whose delay slot is not a "
                                                   f"nop (%o7 cannot be set from a slot)")
            return InsnPlan(kind=StepKind.SIMULATE, simulate=self._sim_call(addr, target),
                            **base)
        if _op(w) == 2:                                      # jmpl: ret, retl, indirect call
            if delay != NOP:
                raise UnsteppableError(EOPNOTSUPP, f"{mnem}: a jmpl whose delay slot is not a "
                                                   f"nop (its target is computed before it)")
            return InsnPlan(kind=StepKind.SIMULATE, simulate=self._sim_jmpl(addr, w), **base)
        kind = _branch_kind(w)
        if kind == "reserved":
            raise UnsteppableError(EOPNOTSUPP, f"{mnem}: reserved branch condition")
        target = (addr + _branch_disp(w)) & _MASK
        if kind in ("always", "never"):
            dest = target if kind == "always" else nxt
            if delay == NOP or _annul(w):
                return InsnPlan(kind=StepKind.SIMULATE, simulate=self._sim_jump(dest), **base)
            # The delay slot runs, then the branch goes (or not): copy the slot alone.
            return InsnPlan(kind=StepKind.OUT_OF_LINE, boostable=True,
                            fixup=("delay", delay, dest), exits=((4, dest),), **base)
        # Conditional: the CPU evaluates the condition in the slot, with the delay slot
        # (annulled or not, as in the original) and two exits.
        return InsnPlan(kind=StepKind.OUT_OF_LINE, boostable=True,
                        fixup=("cond", _with_disp(w, 4), delay, target), exits=((16, target),),
                        **base)

    def slot_code(self, plan: InsnPlan, slot_addr: int, boost: bool) -> bytes:
        """Ordinary:    insn; bp                  (boost: insn; ba,a addr+4)
        delay + jump:   delay; bp                 (boost: delay; ba,a dest)
        conditional:    b<cond> .+16; delay; bp; bp; bp
                        (boost: the first and last bp are ba,a addr+8 and ba,a target)."""
        kind = plan.fixup[0]

        def tail(at: int, to: int) -> int:
            return _ba_a(slot_addr + at, to) if boost else BREAKPOINT

        if kind == "copy":
            words = [int.from_bytes(plan.orig, "big"), tail(4, plan.addr + plan.length)]
        elif kind == "delay":
            _, delay, dest = plan.fixup
            words = [delay, tail(4, dest)]
        else:
            _, branch, delay, target = plan.fixup
            words = [branch, delay, tail(8, plan.addr + plan.length), BREAKPOINT,
                     tail(16, target)]
        return b"".join(x.to_bytes(4, "big") for x in words)

    # -- simulations ---------------------------------------------------------------------------
    @staticmethod
    def _sim_jump(dest: int):
        return lambda r: r.write("pc", dest)

    @staticmethod
    def _sim_call(addr: int, target: int):
        def call(r: RegAccess):
            r.write("o7", addr)
            r.write("pc", target)
        return call

    @staticmethod
    def _sim_jmpl(addr: int, w: int):
        rs1, rd = _REGNAMES[_rs1(w)], _rd(w)
        if _imm(w):
            simm = _simm13(w)
            operand = lambda r: simm                               # noqa: E731
        else:
            rs2 = _REGNAMES[_rs2(w)]
            operand = lambda r: r.read(rs2)                        # noqa: E731

        def jmpl(r: RegAccess):
            target = (r.read(rs1) + operand(r)) & _MASK
            if rd:
                r.write(_REGNAMES[rd], addr)
            r.write("pc", target)
        return jmpl

    @staticmethod
    def _sim_rdpc(addr: int, rd: str):
        def rdpc(r: RegAccess):
            if rd != "g0":
                r.write(rd, addr)
            r.write("pc", addr + 4)
        return rdpc

    def _mnemonic(self, w: int, addr: int) -> str:
        insn = next(self.disassembler().disasm(w.to_bytes(4, "big"), addr, 1), None)
        if insn is None:
            return f".word {w:#010x}"
        return f"{insn.mnemonic} {insn.op_str}".strip()


BACKEND = Sparc64()
"""What every CPU backend declares, and the few small methods generic code may call.

A backend is mostly *facts* (archinfo style): word size, the breakpoint encoding, the
calling convention, the register file as `Register` records, the kernel's fault numbers.  The
machine, the probe core and tracefs ask these facts questions; they never test an
architecture's name, and never guess a register's name from its spelling.

The only behaviour a backend owns is what genuinely differs per instruction set:
  * `CallingConvention` - where arguments, return values and return addresses live;
  * `InsnPlan` construction (`plan_insn`) - how one probed instruction is single-stepped:
    copied out of line (with fixups), simulated, or refused with an errno and a reason;
  * the stack walk's frame records (`unwind_frame`, `frame_pending`, `frame_start`).

What is not the ISA but the emulator - Unicorn's interrupt numbers, its register ids, and
the workarounds for what it lacks or gets wrong - lives apart, in the backend's
`unicorn` object (`cpus._unicorn.UnicornQuirks`).
"""

from __future__ import annotations

import enum
import errno as _errno
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Mapping, Protocol

if TYPE_CHECKING:
    from ._unicorn import UnicornQuirks


@dataclass(frozen=True)
class Register:
    """One register of the register file, as data (after archinfo's `Register`).

    `name` is how the regs view, the calling convention and the simulations spell it.
    `alias_names` are the other spellings a kprobe_events fetch-arg (`%name`) accepts: the
    kernel's (its `regs_query_register_offset` table in arch/*/kernel/ptrace.c, e.g. x86's
    `ax` for rax) and smpkprobes' portable `ip`, `sp` and `flags` where the kernel's table
    does not give those names to another register.  `argument` marks the registers the
    calling convention passes integer arguments in."""

    name: str
    size: int                                  # bytes
    alias_names: tuple[str, ...] = ()
    general_purpose: bool = False
    argument: bool = False


class RegAccess(Protocol):
    """The narrow register/memory interface a calling convention works through."""

    def read(self, reg: str) -> int: ...
    def write(self, reg: str, value: int) -> None: ...
    def read_word(self, addr: int) -> int: ...
    def write_word(self, addr: int, value: int) -> None: ...


@dataclass(frozen=True)
class CallingConvention:
    """A calling convention as data (after qiling's `cc/`), plus the four questions kprobes asks.

    `return_address_reg` is None when the return address lives on the stack at function
    entry (x86), or a register name when it lives in a link register (arm, arm64, ppc).
    """

    word_bytes: int
    arg_regs: tuple[str, ...]
    ret_reg: str
    sp_reg: str
    pc_reg: str
    return_address_reg: str | None = None
    # Bytes between SP at function entry and the first stack-passed argument.
    stack_args_offset: int = 0
    stack_align: int = 16
    # How many arguments a function of unknown arity is given (a jprobe's Python entry that
    # takes *args, or whose signature cannot be read): every argument register, and at
    # least six, as many as a system call takes (SYSCALL_DEFINE6).
    default_arg_count: int = 6

    def arg(self, regs: RegAccess, n: int) -> int:
        """The n-th integer argument (from 0) at function entry."""
        if n < len(self.arg_regs):
            return regs.read(self.arg_regs[n])
        sp = regs.read(self.sp_reg)
        return regs.read_word(sp + self.stack_args_offset + (n - len(self.arg_regs)) * self.word_bytes)

    def set_arg(self, regs: RegAccess, n: int, value: int) -> None:
        if n < len(self.arg_regs):
            regs.write(self.arg_regs[n], value)
            return
        sp = regs.read(self.sp_reg)
        regs.write_word(sp + self.stack_args_offset + (n - len(self.arg_regs)) * self.word_bytes, value)

    def get_return_address(self, regs: RegAccess) -> int:
        if self.return_address_reg is not None:
            return regs.read(self.return_address_reg)
        return regs.read_word(regs.read(self.sp_reg))

    def set_return_address(self, regs: RegAccess, value: int) -> None:
        if self.return_address_reg is not None:
            regs.write(self.return_address_reg, value)
        else:
            regs.write_word(regs.read(self.sp_reg), value)

    def emulate_return(self, regs: RegAccess, value: int | None = None) -> int:
        """Return from the current function as if its first instruction were `ret`.
        Used by hypercall stubs.  Returns the address returned to."""
        if value is not None:
            regs.write(self.ret_reg, value)
        if self.return_address_reg is not None:
            target = regs.read(self.return_address_reg)
        else:
            sp = regs.read(self.sp_reg)
            target = regs.read_word(sp)
            regs.write(self.sp_reg, sp + self.word_bytes)
        regs.write(self.pc_reg, target)
        return target

    def stack_window(self, regs: RegAccess, arg_bytes: int) -> tuple[int, int]:
        """(address, size) of the caller-owned stack a function sees at entry, through
        `arg_bytes` bytes of stack-passed arguments: what a jprobe saves and restores.  The
        default starts at SP; an ABI with a stack bias or a register save area between SP
        and the arguments (sparc64) overrides this."""
        return regs.read(self.sp_reg), arg_bytes

    def setup_call(self, regs: RegAccess, stack_top: int, func: int, args: tuple[int, ...],
                   return_to: int) -> None:
        """Make the CPU look as if `return_to` had just called `func(*args)`."""
        w = self.word_bytes
        nstack = max(0, len(args) - len(self.arg_regs))
        # stack_args_offset is measured from SP at entry, i.e. after a call that pushes the
        # return address; `area` is the same distance from SP just before the call.
        pushed = w if self.return_address_reg is None else 0
        area = self.stack_args_offset - pushed if nstack else 0
        sp = stack_top - nstack * w - area
        sp -= sp % self.stack_align
        mask = (1 << (8 * w)) - 1
        for i, a in enumerate(args[len(self.arg_regs):]):
            regs.write_word(sp + area + i * w, a & mask)
        if self.return_address_reg is None:
            sp -= self.word_bytes
            regs.write_word(sp, return_to)
        else:
            regs.write(self.return_address_reg, return_to)
        regs.write(self.sp_reg, sp)
        for reg, a in zip(self.arg_regs, args):
            regs.write(reg, a & mask)
        regs.write(self.pc_reg, func)


class StepKind(enum.Enum):
    """How a probed instruction is executed after the pre_handler."""

    OUT_OF_LINE = "out-of-line"   # copied into a slot, followed by a breakpoint (or a jump back)
    SIMULATE = "simulate"         # the probe core computes its effect on the registers


@dataclass(frozen=True)
class InsnPlan:
    """Everything the probe core needs to single-step one probed instruction."""

    addr: int
    length: int
    orig: bytes
    mnemonic: str
    kind: StepKind
    # OUT_OF_LINE: the (fixed-up) copy to place at the start of a slot.
    slot_code: bytes = b""
    # Whether a jump back may replace the trailing breakpoint (never with a post_handler).
    boostable: bool = False
    # SIMULATE: a function applying the instruction to registers (RegAccess) at `addr`.
    simulate: Callable[[RegAccess], None] | None = None
    # Arch-private fixup data for `CpuBackend.slot_code` (x86: the RIP-relative displacement).
    fixup: object = None
    # OUT_OF_LINE: more breakpoints that end the step besides the one right after the copy
    # (at offset `length`, resuming at `addr + length`): (offset in the slot, address to
    # resume at).  A conditional branch stepped with its delay slot ends taken or not taken.
    exits: tuple[tuple[int, int], ...] = ()

    def exit_resume(self, offset: int) -> int | None:
        """Where to resume when the step traps at `offset` in its slot; None if that is not
        one of its exits."""
        if offset == self.length:
            return self.addr + self.length
        for off, resume in self.exits:
            if off == offset:
                return resume
        return None


class UnsteppableError(Exception):
    """An instruction that kprobes refuses, with the errno to report and a reason."""

    def __init__(self, errno: int, reason: str):
        super().__init__(reason)
        self.errno = errno
        self.reason = reason


EOPNOTSUPP = _errno.EOPNOTSUPP
EINVAL = _errno.EINVAL


@dataclass(frozen=True)
class CpuBackend:
    """The declarative facts of one architecture.  Subclasses add `plan_insn` and
    `slot_code`."""

    name: str
    bits: int
    endian: str                       # "little" or "big"
    cs_arch: int
    cs_mode: int
    # The breakpoint instruction written over a probed instruction.
    breakpoint: bytes
    # The register file, in the order the regs view and the machine's digests list it.
    register_file: tuple[Register, ...]
    cc: CallingConvention
    flags_reg: str
    fp_reg: str
    # Longest instruction, and the slot size the probe core allocates per probe.
    max_insn_len: int
    slot_size: int
    # The emulator's side: interrupt numbers, register ids, workarounds (cpus/_unicorn.py).
    unicorn: "UnicornQuirks"
    # The trap number the kernel's page-fault path hands a kprobe's fault_handler
    # (kprobe_page_fault(regs, trapnr) in arch/*/mm/fault.c): x86 X86_TRAP_PF; ppc 11;
    # sparc64 0; arm and arm64 pass the fault status register (FSR, ESR) there.
    page_fault_trapnr: int = 0
    # Where, relative to a frame pointer, the saved frame pointer and return address live.
    frame_saved_fp_offset: int = 0
    frame_ret_offset: int = 8
    # 0 for variable-length ISAs; else every instruction is this many bytes.
    fixed_insn_len: int = 0
    # Functions whose return kretprobes must refuse (arch-specific blacklist).
    kretprobe_blacklist: tuple[str, ...] = ()
    # The default kernel image's clang target and flags live in smpkprobes/kernel/build.py.
    extra: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self):
        names = [n for r in self.register_file for n in (r.name, *r.alias_names)]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"{self.name}: register names declared twice: {sorted(dup)}")
        args = tuple(r.name for r in self.register_file if r.argument)
        if set(args) != set(self.cc.arg_regs):
            raise ValueError(f"{self.name}: argument registers {args} are not the calling "
                             f"convention's {self.cc.arg_regs}")

    # -- the register file ----------------------------------------------------------------
    @cached_property
    def registers(self) -> Mapping[str, int]:
        """Register names -> Unicorn ids, in register-file order; the regs view exposes
        exactly these.  A negative id is a register the Unicorn quirks serve themselves
        (`read_special`, `write_special`)."""
        return {r.name: self.unicorn.reg_id(r.name) for r in self.register_file}

    @cached_property
    def _register_names(self) -> Mapping[str, Register]:
        return {n: r for r in self.register_file for n in (r.name, *r.alias_names)}

    def register_by_name(self, name: str) -> Register | None:
        """The register a name or alias (as in a `%name` fetch-arg, without the `%`) stands
        for, or None: exactly the names the records declare."""
        return self._register_names.get(name)

    @property
    def word_bytes(self) -> int:
        return self.bits // 8

    @property
    def word_mask(self) -> int:
        return (1 << self.bits) - 1

    def sign_extend(self, value: int) -> int:
        value &= self.word_mask
        return value - (1 << self.bits) if value >> (self.bits - 1) else value

    def insn_length(self, code: bytes, addr: int) -> int | None:
        """Length of the instruction at the start of `code`, or None if it does not decode.
        Fixed-width ISAs need not override this."""
        if self.fixed_insn_len:
            return self.fixed_insn_len if len(code) >= self.fixed_insn_len else None
        insn = next(self.disassembler().disasm(code[:self.max_insn_len], addr, 1), None)
        return None if insn is None else insn.size

    def disassembler(self):
        """A capstone instance with details on, made once per backend."""
        cs = self.__dict__.get("_cs_instance")
        if cs is None:
            import capstone
            cs = capstone.Cs(self.cs_arch, self.cs_mode)
            cs.detail = True
            object.__setattr__(self, "_cs_instance", cs)
        return cs

    def plan_insn(self, code: bytes, addr: int) -> InsnPlan:   # pragma: no cover - abstract
        raise NotImplementedError

    def slot_code(self, plan: InsnPlan, slot_addr: int, boost: bool) -> bytes:  # pragma: no cover
        """The slot's bytes: the copy of the instruction, fixed up for `slot_addr`, then the
        breakpoint that ends the step, or a jump back to the next instruction when boosting."""
        raise NotImplementedError

    def unwind_frame(self, read_word: Callable[[int], int], fp: int) -> tuple[int, int]:
        """One step of the stack walk from the frame at `fp` (a value of `fp_reg`): that
        frame's return address and the caller's frame.  The default is a frame record of
        saved frame pointer and return address at fixed offsets from `fp` (x86 rbp, arm64
        x29); an ABI whose return address lives elsewhere (ppc: in the caller's frame)
        overrides this.  A return address of 0 ends the walk."""
        return read_word(fp + self.frame_ret_offset), read_word(fp + self.frame_saved_fp_offset)

    def is_trap_insn(self, code: bytes) -> bool:
        """Whether `code` (len(breakpoint) bytes of text) is an instruction that traps with
        `unicorn.trap_intno`: the kprobes breakpoint, or a foreign one such as a compiler's
        trap.  A trap at an address holding neither is a probe removed under a trapped CPU; a
        foreign trap instruction is not, and re-executing it would trap for ever.  The
        default knows only the kprobes breakpoint (x86: every int3 is 0xcc); an ISA whose
        breakpoint carries an immediate (arm64 `brk #imm`) recognises all of them."""
        return code == self.breakpoint

    def frame_pending(self, code: bytes) -> bool:
        """Whether a function has not built its frame record yet, given its `code` from its
        entry up to (not including) the current instruction: its return address is then
        still where the calling convention put it at entry.  The default is true only at
        the entry itself (x86 `push rbp`, arm64 `stp x29, x30` come first); an ABI whose
        leaf functions build no frame record at all (arm) overrides this."""
        return not code

    def plan_probe(self, text: Callable[[int, int], bytes], addr: int) -> InsnPlan:
        """Plan a probe at `addr`, reading the original text through `text(addr, size)`.
        The default plans the instruction alone; an ISA with delay slots (sparc64) first
        refuses an instruction that runs in the delay slot of the one before it."""
        return self.plan_insn(text(addr, self.max_insn_len), addr)

    def frame_start(self, cpu, regs) -> int:
        """The frame pointer the stack walk starts from, with the frame records it reads in
        memory.  The default is `fp_reg`; register-window ISAs (sparc64) flush the windows
        to their save areas first, as Linux does before a stack trace."""
        return regs.read(self.fp_reg)

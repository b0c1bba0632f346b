"""Every arch fact lives in cpus/ as data, and the generic code asks for it.

  * the register file is a tuple of `Register` records (name, size, aliases, argument flag);
    tracefs takes exactly the names and aliases they declare - the kernel's pt_regs
    spellings (arch/*/kernel/ptrace.c regoffset_table) among them - and refuses any other
    with the kernel's "Invalid register name";
  * the trap number a fault_handler gets for a guest fault is the backend's
    `page_fault_trapnr` (the kernel's kprobe_page_fault argument on that arch);
  * a Python jprobe entry of unknown arity gets the calling convention's default_arg_count;
  * what is Unicorn's rather than the ISA's lives in `backend.unicorn`.
"""

import dataclasses
import errno
import re

import pytest

from smpkprobes import Jprobe, Kprobe, Machine, cpus, jprobe_return
from smpkprobes.kprobes._tracefs import ERRORS, TraceProbeError

ARCHES = cpus.available()

# The kernel's regs_query_register_offset names (arch/*/kernel/ptrace.c regoffset_table)
# that smpkprobes models, and the register each stands for here.
KERNEL_NAMES = {
    "x86_64": {**{k: "r" + k for k in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp")},
               **{f"r{n}": f"r{n}" for n in range(8, 16)}, "ip": "rip", "flags": "rflags"},
    "i386": {**{k: "e" + k for k in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp")},
             "ip": "eip", "flags": "eflags"},
    "arm64": {**{f"x{n}": f"x{n}" for n in range(31)}, "lr": "x30", "sp": "sp", "pc": "pc",
              "pstate": "nzcv"},
    "arm": {**{f"r{n}": f"r{n}" for n in range(11)}, "fp": "r11", "ip": "r12", "sp": "sp",
            "lr": "lr", "pc": "pc", "cpsr": "cpsr"},
    "ppc": {**{f"r{n}": f"r{n}" for n in range(32)}, **{f"gpr{n}": f"r{n}" for n in range(32)},
            "nip": "pc", "msr": "msr", "ctr": "ctr", "link": "lr", "xer": "xer", "ccr": "cr"},
    # The kernel's i0..i7 (the trapped window's outs) clash with the ISA's names, kept here.
    "sparc64": {**{f"g{n}": f"g{n}" for n in range(8)}, "pc": "pc", "y": "y", "lr": "o7"},
}
# The kernel's names for pt_regs fields smpkprobes does not model: refused.
KERNEL_UNMODELLED = {
    "x86_64": ("orig_ax", "cs", "ss"),
    "i386": ("orig_ax", "cs", "ss", "ds", "es", "fs", "gs"),
    "arm64": (),
    "arm": ("ORIG_r0",),
    "ppc": ("trap", "dar", "dsisr", "mq", "softe"),
    "sparc64": ("tstate", "npc"),
}
# The ISA spellings of other architectures, and nonsense: refused everywhere they are not
# declared.
FOREIGN = ("rax", "eax", "ax", "x0", "r0", "r12", "o0", "i0", "g1", "nip", "pstate", "lr",
           "fp", "cpsr", "nzcv", "rflags", "ccr", "zz", "RAX", "X0", "r99", "")


def _names(backend):
    return {n: r.name for r in backend.register_file for n in (r.name, *r.alias_names)}


@pytest.fixture(params=ARCHES)
def arch(request):
    return request.param


# -- the records ----------------------------------------------------------------------------
def test_register_records(arch):
    """The records are the register file: the regs view's names in order, sizes of a word,
    argument flags exactly the calling convention's argument registers, and the kernel's
    names declared as aliases."""
    b = cpus.get_backend(arch)
    assert list(b.registers) == [r.name for r in b.register_file]
    assert all(isinstance(r, cpus.Register) and r.size == b.word_bytes
               for r in b.register_file)
    assert [r.name for r in b.register_file if r.argument] == sorted(
        b.cc.arg_regs, key=[r.name for r in b.register_file].index)
    names = _names(b)
    for kname, reg in KERNEL_NAMES[arch].items():
        assert names.get(kname) == reg, kname
        assert b.register_by_name(kname).name == reg
    for kname in KERNEL_UNMODELLED[arch]:
        assert b.register_by_name(kname) is None
    # The registers the machine names generically are in the file.
    for reg in (b.cc.pc_reg, b.cc.sp_reg, b.cc.ret_reg, b.flags_reg, b.fp_reg):
        assert b.register_by_name(reg).name == reg


def test_records_refuse_duplicates_and_stray_argument_flags():
    b = cpus.get_backend("x86_64")
    regs = b.register_file
    dup = regs + (cpus.Register("rax2", 8, ("ax",)),)
    with pytest.raises(ValueError, match="declared twice"):
        cpus.CpuBackend(**{**_fields(b), "register_file": dup})
    stray = tuple(cpus.Register(r.name, r.size, r.alias_names, r.general_purpose,
                                r.argument or r.name == "rax") for r in regs)
    with pytest.raises(ValueError, match="argument registers"):
        cpus.CpuBackend(**{**_fields(b), "register_file": stray})


def _fields(b):
    return {f.name: getattr(b, f.name) for f in dataclasses.fields(cpus.CpuBackend)}


def test_unicorn_quirks_are_apart(arch):
    """The ISA class carries no Unicorn facts: the engine, the breakpoint's interrupt
    number, register ids and workarounds are all in `backend.unicorn`."""
    b = cpus.get_backend(arch)
    q = b.unicorn
    assert isinstance(q, cpus.UnicornQuirks)
    for attr in ("uc_arch", "uc_mode", "trap_intno", "trap_pc_offset", "uc_setup",
                 "context_save", "read_special", "emu_start_address", "handle_arch_trap"):
        assert not hasattr(b, attr), attr
    assert all(isinstance(q.reg_id(r.name), int) for r in b.register_file)


# -- tracefs takes exactly the declared names ------------------------------------------------
async def test_tracefs_takes_every_declared_name(arch):
    """One event fetching every register by every name the records declare: each name is
    accepted, and a name and its aliases read the same register."""
    async with Machine(arch=arch, cpus=1, seed=0) as m:
        b = m.backend
        names = _names(b)
        args = {f"a{i}": n for i, n in enumerate(names)}
        await m.tracefs.write("kprobe_events", "p:facts/regs kprobe_target " +
                              " ".join(f"{a}=%{n}" for a, n in args.items()))
        await m.tracefs.write("events/facts/regs/enable", "1")
        assert await m.call("kprobe_target", 9) == 3
        line = m.tracefs.read("trace").splitlines()[-1]
        values = dict(re.findall(r" (a\d+)=(\S+)", line))
        assert set(values) == set(args)
        by_reg = {}
        for a, n in args.items():
            by_reg.setdefault(names[n], set()).add(values[a])
        assert all(len(v) == 1 for v in by_reg.values()), by_reg
        if b.cc.arg_regs:
            assert by_reg[b.cc.arg_regs[0]] == {"0x9"}


async def test_tracefs_refuses_undeclared_names(arch):
    """Any other name - another architecture's, a pt_regs field not modelled, nonsense - is
    refused with the kernel's BAD_REG_NAME, as regs_query_register_offset's -EINVAL is."""
    async with Machine(arch=arch, cpus=1, seed=0) as m:
        names = _names(m.backend)
        for name in (*KERNEL_UNMODELLED[arch], *FOREIGN):
            if name in names:
                continue
            line = f"p:facts/bad kprobe_target v=%{name}"
            with pytest.raises(TraceProbeError) as e:
                await m.tracefs.write("kprobe_events", line)
            err = e.value
            assert (err.code, err.reason, err.errno) == (
                "BAD_REG_NAME", ERRORS["BAD_REG_NAME"][1], errno.EINVAL), name
            # the caret points at the register, after the '%' (trace_probe.c's offset)
            assert err.column == line.index("%") + 1, (name, err.column)
        assert m.tracefs.read("kprobe_events") == ""


# -- the fault number and the argument count come from the backend ------------------------
async def test_fault_handler_gets_the_backends_page_fault_number(arch):
    """A handler's nested guest call that faults reaches the fault_handler with the arch's
    page-fault trap number (x86: 14, X86_TRAP_PF; ppc: 11; sparc64: 0; arm/arm64: the
    FSR/ESR of a translation fault)."""
    async with Machine(arch=arch, cpus=1, seed=0) as m:
        seen = []
        kp = Kprobe(symbol_name="kprobe_target",
                    pre_handler=lambda p, r: r.cpu.call("null_deref"),
                    fault_handler=lambda p, r, trapnr: seen.append(trapnr) or 1)
        await m.kprobes.register_kprobe(kp)
        assert await m.call("kprobe_target", 9) == 3
        await m.kprobes.unregister_kprobe(kp)
        assert seen == [m.backend.page_fault_trapnr] and kp.nmissed == 1


def test_page_fault_numbers():
    expected = {"x86_64": 14, "i386": 14, "ppc": 11, "sparc64": 0, "arm": 0x007,
                "arm64": 0x96000007}
    assert {a: cpus.get_backend(a).page_fault_trapnr for a in ARCHES} == \
        {a: expected[a] for a in ARCHES}


async def test_jprobe_entry_of_unknown_arity_gets_the_default_arg_count(arch):
    """A Python jprobe entry taking *args gets the calling convention's default_arg_count
    arguments, the first one the real first argument."""
    async with Machine(arch=arch, cpus=1, seed=0) as m:
        got = []

        def entry(*args):
            got.append(args)
            jprobe_return()
        jp = Jprobe(entry, symbol_name="kprobe_target")
        await m.kprobes.register_jprobe(jp)
        assert await m.call("kprobe_target", 9) == 3
        await m.kprobes.unregister_jprobe(jp)
        (args,) = got
        assert len(args) == m.backend.cc.default_arg_count and args[0] == 9

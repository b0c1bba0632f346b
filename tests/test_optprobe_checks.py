"""Jump optimization's safety checks (smpkprobes/kprobes/_optcheck.py) and the per-arch
facts and detour layout (cpus/_optprobe.py), on hand-made x86_64 text and on the default
kernels."""

import pytest

from smpkprobes import Machine, cpus
from smpkprobes.cpus._optprobe import NO_OPTPROBES, detour_layout, opt_facts
from smpkprobes.kprobes._optcheck import NotOptimizable, prepare_region

X86 = cpus.get_backend("x86_64")
FUNC = 0x100000


def _region(code: bytes, off: int, backend=X86):
    def text(addr, size):
        i = addr - FUNC
        return code[i:i + size] if 0 <= i < len(code) else b""
    return prepare_region(backend, opt_facts(backend), text, FUNC, len(code), FUNC + off)


# push rbp; mov rbp, rsp; xor eax, eax; nop; nop; pop rbp; ret
PLAIN = bytes.fromhex("55" "4889e5" "31c0" "90" "90" "5d" "c3")


def test_region_is_whole_instructions_covering_the_jump():
    """At +0 the region is push, mov, xor: the first whole instructions covering 5 bytes."""
    plans = _region(PLAIN, 0)
    assert [(p.addr - FUNC, p.length) for p in plans] == [(0, 1), (1, 3), (4, 2)]


def test_region_past_the_function_end_is_refused():
    """A region that would run past the function's last byte is refused (check 1)."""
    with pytest.raises(NotOptimizable, match="runs past the end of its function"):
        _region(PLAIN, 7)


def test_jump_into_the_region_is_refused():
    """A jump landing inside the region, not on its first byte, is refused (check 2)."""
    code = bytes.fromhex("55" "4889e5" "31c0" "ebfc" "5d" "c3")     # ... jmp +4 (xor)
    with pytest.raises(NotOptimizable, match=r"jump at 0x100006 lands inside the region, "
                                             r"at 0x100004"):
        _region(code, 0)


def test_jump_to_the_first_byte_is_allowed():
    """A jump to the probed instruction itself is harmless: the branch starts there."""
    code = bytes.fromhex("55" "4889e5" "31c0" "909090" "ebf9" "5d" "c3")   # jmp +4 (xor)
    assert [p.addr - FUNC for p in _region(code, 4)] == [4, 6, 7, 8]


def test_indirect_jump_anywhere_in_the_function_is_refused():
    """An indirect jump anywhere in the function refuses every region of it (check 3)."""
    code = bytes.fromhex("55" "4889e5" "31c0" "90" "90" "ffe0" "5d" "c3")   # jmp rax
    with pytest.raises(NotOptimizable, match=r"indirect jump at 0x100008 \(jmp rax\)"):
        _region(code, 0)


def test_instruction_that_cannot_run_out_of_line_is_refused():
    """A region holding a simulated instruction (a call) is refused (check 4)."""
    code = bytes.fromhex("55" "e800000000" "5d" "c3")                 # push; call; pop; ret
    with pytest.raises(NotOptimizable, match=r"0x100001 \(call 0x100006\) cannot run out of "
                                             r"line with a jump back"):
        _region(code, 0)


def test_refused_instruction_in_the_region_is_refused():
    """A region holding an instruction kprobes refuses outright (ud2) says why."""
    code = bytes.fromhex("55" "0f0b" "90" "90" "5d" "c3")
    with pytest.raises(NotOptimizable, match="ud2: undefined instruction"):
        _region(code, 0)


def test_detour_copies_the_region_and_jumps_back():
    """The stub jumps to the buffer; the buffer is the copied region and a jump back."""
    facts = opt_facts(X86)
    plans = _region(PLAIN, 0)
    lay = detour_layout(X86, facts, plans, 0x700000, 0x710000)
    assert lay.stub_code == b"\xe9" + (0x710000 - 0x700005).to_bytes(4, "little", signed=True)
    back = 0x100006 - (0x710006 + 5)
    assert lay.buffer_code == PLAIN[:6] + b"\xe9" + back.to_bytes(4, "little", signed=True)


def test_detour_fixes_rip_relative_copies():
    """A RIP-relative instruction copied into the buffer still reaches its target."""
    code = bytes.fromhex("488b0510000000" "5d" "c3")       # mov rax, [rip + 0x10]
    plans = _region(code, 0)
    lay = detour_layout(X86, opt_facts(X86), plans, 0x700000, 0x710000)
    insn = next(X86.disassembler().disasm(lay.buffer_code, 0x710000, 1))
    target = 0x710000 + insn.size + insn.disp
    assert target == FUNC + 7 + 0x10


@pytest.mark.parametrize("arch", ["arm", "ppc"])
def test_single_branch_arches_optimize_one_instruction(arch):
    """arm and ppc replace exactly the probed instruction with one `b` within 32 MiB."""
    facts = opt_facts(cpus.get_backend(arch))
    assert (facts.jump_len, facts.reach, facts.scan_function) == (4, 1 << 25, False)
    assert facts.in_reach(0x100000, 0x100000 + (1 << 25) - 4)
    assert not facts.in_reach(0x100000, 0x100000 + (1 << 25))


@pytest.mark.parametrize("arch,word", [("arm", 0xEA000000 | (0x10000 - 8) >> 2),
                                       ("ppc", 0x48000000 | 0x10000)])
def test_single_branch_encodings(arch, word):
    """arm `b` is relative to pc + 8; ppc `b` to the branch itself."""
    backend = cpus.get_backend(arch)
    code = opt_facts(backend).encode_jump(0x100000, 0x110000)
    insn = next(backend.disassembler().disasm(code, 0x100000, 1))
    assert int.from_bytes(code, "little" if backend.endian == "little" else "big") == word
    assert insn.mnemonic == "b" and insn.operands[0].imm == 0x110000


@pytest.mark.parametrize("arch", ["arm64", "sparc64"])
def test_trap_based_arches_say_why(arch):
    """arm64 and sparc64 have no optprobes facts, and a reason instead."""
    assert opt_facts(cpus.get_backend(arch)) is None
    assert "Linux has no optprobes" in NO_OPTPROBES[arch]


EXPECTED = {
    # (arch, function): offsets whose region passes checks 1-4.
    ("x86_64", "kprobe_target"): [0x0, 0x1, 0x4, 0x6, 0xb, 0xf],
    ("i386", "kprobe_target"): [0x0, 0x1, 0x3, 0x8, 0xb],
    ("arm", "kprobe_target"): [0x0, 0x4, 0x8, 0xc],
    ("ppc", "kprobe_target"): [0x0, 0x4, 0x8, 0xc, 0x10, 0x14, 0x18, 0x1c, 0x20],
    ("i386", "fork_loop"): [0x0, 0x1, 0x3, 0x4, 0x5, 0x10, 0x12, 0x14, 0x16, 0x27],
}


@pytest.mark.parametrize("arch,func", sorted(EXPECTED))
async def test_default_kernel_regions(arch, func):
    """Exactly these instruction boundaries of the default kernels pass checks 1-4."""
    async with Machine(arch=arch, cpus=1, seed=0) as m:
        sym = m.kallsyms.lookup(func)
        backend = m.backend
        ok = []
        for insn in backend.disassembler().disasm(m.memory.peek(sym.addr, sym.size), sym.addr):
            try:
                prepare_region(backend, opt_facts(backend), m.kprobes.original_text,
                               sym.addr, sym.size, insn.address)
            except NotOptimizable:
                continue
            ok.append(insn.address - sym.addr)
        assert ok == EXPECTED[arch, func]

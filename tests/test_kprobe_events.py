"""kprobe_events beyond the ported selftests: the new fetch forms and their printed values,
set_event, error_log's reset, multi-probe removal, the trace reset on removal, and module
semantics (MOD:SYM before the module loads, GONE, re-arming)."""

import errno
import functools

import pytest
import trio

from smpkprobes import KprobeError, Machine
from smpkprobes.kprobes._tracefs import TraceProbeError


@pytest.fixture
async def m():
    async with Machine(cpus=1, seed=7) as machine:
        yield machine


async def one_line(m, definition: str, call=("fork_loop", 1)) -> str:
    fs = m.tracefs
    await fs.write("kprobe_events", definition)
    await fs.write("events/enable", "1")
    await m.call(*call)
    await fs.write("events/enable", "0")
    [line] = fs.read("trace_pipe").splitlines()
    return line.split(") ", 1)[1] if ") " in line else ""


async def test_symbol_minus_offset_and_a_dereference_of_it(m):
    """@SYM-offs reads memory before SYM; +10(@SYM-10) dereferences the word read there."""
    sdata = m.kallsyms_lookup_name("_sdata")
    word = m.backend.word_bytes
    got = await one_line(m, "p do_fork a=@_sdata-10:x8 b=+10(@_sdata-10):x8 c=@_sdata+8:u64")
    at = m.read_memory(sdata - 10, 1)[0]
    ptr = int.from_bytes(m.read_memory(sdata - 10, word), m.backend.endian)
    try:
        b = f"{m.read_memory(ptr + 10, 1)[0]:#x}"
    except (ValueError, OSError):
        b = "(fault)"
    c = int.from_bytes(m.read_memory(sdata + 8, 8), m.backend.endian)
    assert got == f"a={at:#x} b={b} c={c}"


async def test_immediates(m):
    """\\N, \\-N and \\"text" are values; an immediate is not an address unless :string."""
    got = await one_line(m, 'p do_fork a=\\1 b=\\-1:s32 c=\\0x10:u8 d=\\"hello" e=\\1:string')
    assert got == 'a=0x1 b=-1 c=16 d="hello" e=(fault)'


async def test_arrays_bitfields_chars_symbols(m):
    """TYPE[N] reads N consecutive values (strings: N pointers); bN@O/C a bit field; char a
    character; symbol and symstr an address as %pS."""
    passwd = m.kallsyms_lookup_name("passwd_name")
    got = await one_line(
        m, "p do_sys_open n=+0($arg2):u8[3] c=+1($arg2):char[3] f=+0($arg2):b4@4/8 "
           "s=@do_sys_open:x8[2]", call=("open_loop", 1, 0))
    raw = m.read_memory(passwd, 4)
    # While armed, the probed byte reads as the breakpoint, as memory holds it (so does the
    # kernel's); the next byte is the function's own.
    text = [m.backend.breakpoint[0], m.read_memory(m.kallsyms_lookup_name("do_sys_open"), 2)[1]]
    assert got == (f"n={{{raw[0]},{raw[1]},{raw[2]}}} c={{'e','t','c'}} "
                   f"f={(raw[0] >> 4) & 0xF} s={{{text[0]:#x},{text[1]:#x}}}")
    got = await one_line(m, "r do_sys_open ra=$stack0:symbol name=$retval:symstr",
                         call=("open_loop", 1, 0))
    assert got.startswith("ra=") and 'name="' in got


async def test_string_arrays_read_pointers(m):
    """`:string[N]` on a dereference reads N string pointers from that address."""
    fs = m.tracefs
    await fs.write("kprobe_events", "p:e do_sys_open s=+0($stack):string[1]")
    assert fs.read("kprobe_events") == "p:kprobes/e do_sys_open s=+0($stack):string[1]\n"


async def test_set_event(m):
    """set_event lists enabled events as GRP:EVENT; `>` disables all first, `>>` adds, `!`
    removes, `*` matches any part, a bare word matches an event or a group name."""
    fs = m.tracefs
    await fs.write("kprobe_events", "p:a do_fork\np:g2/b vfs_read\np:g2/c do_exit")
    await fs.write("set_event", "kprobes:a")
    assert fs.read("set_event") == "kprobes:a\n"
    await fs.write("set_event", "g2:*", append=True)
    assert fs.read("set_event") == "kprobes:a\ng2:b\ng2:c\n"
    assert fs.read("events/g2/b/enable") == "1\n"
    await fs.write("set_event", "!c", append=True)
    assert fs.read("set_event") == "kprobes:a\ng2:b\n" and fs.read("events/g2/enable") == "X\n"
    await fs.write("set_event", "g2")
    assert fs.read("set_event") == "g2:b\ng2:c\n" and fs.read("events/enable") == "X\n"
    with pytest.raises(KprobeError) as e:
        await fs.write("set_event", "nosuch:event", append=True)
    assert e.value.errno == errno.EINVAL
    await fs.write("set_event", "")
    assert fs.read("set_event") == "" and fs.read("events/enable") == "0\n"


async def test_error_log_reset_semantics(m):
    """`echo >> error_log` keeps the entries, `echo > error_log` clears them; a successful
    command adds nothing; each entry is stamped [seconds.microseconds]."""
    fs = m.tracefs
    with pytest.raises(TraceProbeError):
        await fs.write("kprobe_events", "p vfs_read $foo")
    await fs.write("kprobe_events", "p vfs_read")
    await fs.write("error_log", "x", append=True)
    log = fs.read("error_log")
    assert log.count("trace_kprobe: error:") == 1
    assert log.startswith("[    0.") and log[13:15] == "] "
    await fs.write("error_log", "")
    assert fs.read("error_log") == ""


async def test_removing_probes_of_a_multiprobe_event(m):
    """A probe with siblings goes even while the event is enabled; the last one is EBUSY.
    A delete names the probe by its point and arguments."""
    fs = m.tracefs
    await fs.write("kprobe_events", "p:ev do_fork x=%ip\np:ev vfs_read x=%ip")
    await fs.write("events/kprobes/ev/enable", "1")
    with pytest.raises(KprobeError) as e:
        await fs.write("kprobe_events", "-:ev vfs_read x=%sp", append=True)
    assert e.value.errno == errno.ENOENT
    await fs.write("kprobe_events", "-:ev vfs_read x=%ip", append=True)
    assert fs.read("kprobe_events") == "p:kprobes/ev do_fork x=%ip\n"
    with pytest.raises(KprobeError) as e:
        await fs.write("kprobe_events", "-:kprobes/ev", append=True)
    assert e.value.errno == errno.EBUSY and fs.read("kprobe_events")
    assert m.debugfs.read("kprobes/list").count("\n") == 1


async def test_removing_an_event_that_was_enabled_clears_the_trace(m):
    """As the kernel's dyn_event_release: the buffer is reset when an event that was ever
    enabled is removed; removing one never enabled keeps it."""
    fs = m.tracefs
    await fs.write("kprobe_events", "p:a do_fork\np:b vfs_read")
    await fs.write("events/kprobes/a/enable", "1")
    await m.call("fork_loop", 1)
    await fs.write("events/kprobes/a/enable", "0")
    await fs.write("kprobe_events", "-:b", append=True)
    assert "a: (do_fork" in fs.read("trace")
    await fs.write("kprobe_events", "-:a", append=True)
    assert "do_fork" not in fs.read("trace")


async def test_mid_instruction_offset_is_bad_insn_bndry():
    """A probe point inside an instruction: BAD_INSN_BNDRY, EILSEQ, caret at the point."""
    async with Machine(arch="x86_64", cpus=1) as m:
        codes = {}
        for off in range(1, 9):
            try:
                await m.tracefs.write("kprobe_events", f"p do_fork+{off}")
            except TraceProbeError as err:
                codes[off] = (err.code, err.errno, err.column)
        assert ("BAD_INSN_BNDRY", errno.EILSEQ, 3) in codes.values()


async def test_mod_sym_before_the_module_loads(m):
    """A MOD:SYM probe of a module not loaded is defined and waits: nothing in kprobes/list,
    its enable flag settable; the load registers it, armed since its event is enabled.
    $argN needs a function entry the kernel cannot see yet: NOFENTRY_ARGS."""
    fs = m.tracefs
    with pytest.raises(TraceProbeError) as e:
        await fs.write("kprobe_events", "p:w example_mod:example_mod_func x=$arg1")
    assert e.value.code == "NOFENTRY_ARGS"
    await fs.write("kprobe_events", "p:w example_mod:example_mod_func x=%ip\n"
                                    "r:wr example_mod:example_mod_func+0 v=$retval")
    assert m.debugfs.read("kprobes/list") == ""
    await fs.write("events/kprobes/w/enable", "1")
    await m.load_module("example_mod")
    listed = m.debugfs.read("kprobes/list").splitlines()
    assert len(listed) == 2 and "[example_mod]" in listed[0]
    assert sum("[DISABLED]" in line for line in listed) == 1     # wr is not enabled
    assert await m.call("example_mod_func", 1) == 2
    assert "w: (example_mod_func+0x0)" in fs.read("trace")
    assert fs.read("kprobe_profile").split() == ["w", "1", "0", "wr", "0", "0"]


async def test_a_plain_symbol_probe_on_a_module_stays_gone(m):
    """Only MOD:SYM probes are re-registered when their module comes back (the kernel's
    trace_kprobe_within_module); a probe defined by the bare symbol stays GONE."""
    fs = m.tracefs
    mod = await m.load_module("example_mod")
    await fs.write("kprobe_events", "p:bare example_mod_func\np:named example_mod:example_mod_func")
    await m.unload_module(mod)
    assert m.debugfs.read("kprobes/list").count("[GONE]") == 2
    await fs.write("events/kprobes/enable", "1")          # accepted; nothing is armed
    assert fs.read("events/kprobes/bare/enable") == "1\n"
    await m.load_module("example_mod")
    bare, named = fs.events()
    assert bare.kp.gone and named.registered and not named.kp.gone
    assert m.debugfs.read("kprobes/list").count("[GONE]") == 1


async def test_a_re_registered_probe_beside_a_gone_one_fires(m):
    """The kernel's register_aggr_kprobe re-arms a GONE aggregate for a new probe: the
    re-registered MOD:SYM probe fires while the bare one beside it stays GONE."""
    fs = m.tracefs
    mod = await m.load_module("example_mod")
    await fs.write("kprobe_events", "p:bare example_mod_func\np:named example_mod:example_mod_func")
    await m.unload_module(mod)
    await fs.write("events/kprobes/enable", "1")
    await m.load_module("example_mod")
    await m.call("example_mod_func", 1)
    assert [line.split(": ")[1] for line in fs.read("trace").splitlines()
            if not line.startswith("#")] == ["named"]


# == the trace buffer: buffer_size_kb per CPU, overwrite, the header's counts ==================
def _body(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if not ln.startswith("#")]


def _counts(text: str) -> tuple[int, int]:
    [head] = [ln for ln in text.splitlines() if "entries-in-buffer" in ln]
    shown, written = head.split(": ")[1].split()[0].split("/")
    return int(shown), int(written)


def _newest_that_fit(lines: list[str], limit: int) -> list[str]:
    """The longest suffix of `lines` whose sizes (text and newline) fit in `limit` bytes."""
    kept, used = [], 0
    for line in reversed(lines):
        if used + len(line) + 1 > limit:
            break
        kept.append(line)
        used += len(line) + 1
    return kept[::-1]


@pytest.mark.parametrize("sizes_kb", [(1, 1), (1, 3), (2, 1), (5, 5)])
async def test_each_cpu_keeps_its_newest_lines_that_fit(sizes_kb):
    """Differential: with per-CPU sizes, `trace` holds, for each CPU, exactly the newest
    lines it wrote whose sizes fit in its buffer_size_kb, in the order written; the header
    counts them against every line written; trace_pipe hands out only lines still there."""
    async with Machine(cpus=2, seed=11) as m:
        fs = m.tracefs
        for cpu, kb in enumerate(sizes_kb):
            await fs.write(f"per_cpu/cpu{cpu}/buffer_size_kb", f"{kb}\n")
        assert fs.read("buffer_size_kb") == ("X\n" if len(set(sizes_kb)) > 1
                                             else f"{sizes_kb[0]}\n")
        assert fs.read("buffer_total_size_kb") == f"{sum(sizes_kb)}\n"
        seen = []
        fs.follow(seen.append)
        await fs.write("kprobe_events", "p:f do_fork flags=$arg1:x64 me=$comm\n"
                                        "r:o do_sys_open ret=$retval:s32")
        await fs.write("events/enable", "1")
        async with trio.open_nursery() as n:
            n.start_soon(functools.partial(m.call, "fork_loop", 60, cpu=0))
            n.start_soon(functools.partial(m.call, "open_loop", 40, 3, cpu=1))
            n.start_soon(functools.partial(m.call, "fork_loop", 30, cpu=1))
        await fs.write("events/enable", "0")
        text = fs.read("trace")
        expected = []
        for cpu, kb in enumerate(sizes_kb):
            mine = [ln for ln in seen if f"[{cpu:03d}]" in ln]
            expected += _newest_that_fit(mine, kb << 10)
        body = _body(text)
        assert sorted(body, key=seen.index) == body          # the order they were written
        assert sorted(body) == sorted(expected)
        assert _counts(text) == (len(expected), len(seen)) and len(seen) == 60 + 40 + 30
        assert fs.read("trace_pipe").splitlines() == body and fs.read("trace_pipe") == ""


async def test_shrinking_drops_the_oldest_lines_and_a_clear_zeroes_the_counts():
    """A smaller buffer_size_kb drops the oldest lines, counted as overwritten (entries
    written stays); writing to `trace` empties the buffers and zeroes both counts."""
    async with Machine(cpus=1, seed=3) as m:
        fs = m.tracefs
        await fs.write("kprobe_events", "p:f do_fork flags=$arg1:x64")
        await fs.write("events/enable", "1")
        await m.call("fork_loop", 100)
        before = _body(fs.read("trace"))
        assert _counts(fs.read("trace")) == (100, 100)
        await fs.write("buffer_size_kb", "2")
        after = _body(fs.read("trace"))
        assert after == _newest_that_fit(before, 2048) and 0 < len(after) < 100
        assert _counts(fs.read("trace")) == (len(after), 100)
        await fs.write("buffer_size_kb", "4")                  # growing loses nothing more
        assert _body(fs.read("trace")) == after
        await fs.write("trace", "")
        assert _counts(fs.read("trace")) == (0, 0) and fs.read("trace_pipe") == ""
        await m.call("fork_loop", 1)
        assert _counts(fs.read("trace")) == (1, 1)


async def test_a_line_larger_than_the_buffer_is_dropped():
    """A line that does not fit in the whole per-CPU buffer is not recorded (the kernel
    refuses an event larger than its buffer can hold); the smaller lines stay."""
    async with Machine(cpus=1, seed=3) as m:
        fs = m.tracefs
        wide = " ".join(f"an_argument_named_{i:02d}=$comm" for i in range(40))
        await fs.write("kprobe_events", f"p:small do_fork\np:big do_fork {wide}")
        await fs.write("buffer_size_kb", "1")
        await fs.write("events/enable", "1")
        seen = []
        fs.follow(seen.append)
        await m.call("fork_loop", 2)
        small = [ln for ln in seen if ": small: " in ln]
        assert len(seen) == 4 and len(small) == 2
        assert all(len(ln) < 1023 if ln in small else len(ln) > 1024 for ln in seen)
        assert _body(fs.read("trace")) == small
        assert _counts(fs.read("trace")) == (2, 2)


@pytest.mark.parametrize("path, text, code", [
    ("buffer_size_kb", "0", errno.EINVAL), ("buffer_size_kb", "0\n", errno.EINVAL),
    ("buffer_size_kb", "", errno.EINVAL), ("buffer_size_kb", "1k", errno.EINVAL),
    ("buffer_size_kb", "-1", errno.EINVAL), ("buffer_size_kb", "0x10", errno.EINVAL),
    ("buffer_size_kb", str(1 << 64), errno.ERANGE),
    ("per_cpu/cpu0/buffer_size_kb", "0", errno.EINVAL),
    ("per_cpu/cpu1/buffer_size_kb", "1", errno.ENOENT),
    ("per_cpu/cpu01/buffer_size_kb", "1", errno.ENOENT),
    ("buffer_total_size_kb", "1", errno.EACCES)])
async def test_bad_buffer_size_writes_change_nothing(m, path, text, code):
    """buffer_size_kb takes a decimal number of KiB, not 0 (EINVAL; ERANGE past 64 bits);
    a CPU the machine does not have is ENOENT; buffer_total_size_kb is read-only."""
    with pytest.raises(KprobeError, match="buffer_(total_)?size_kb|per_cpu") as err:
        await m.tracefs.write(path, text)
    assert err.value.errno == code
    assert m.tracefs.read("buffer_size_kb") == "1408\n"
    assert m.tracefs.read("per_cpu/cpu0/buffer_size_kb") == "1408\n"
    assert m.tracefs.read("buffer_total_size_kb") == "1408\n"


# == any definition: accepted and listed back the same, or refused with a sane caret ==============
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

BASES = ["%ip", "%sp", "$stack", "$stack0", "$stack3", "$comm", "$retval", "$arg1", "$arg2",
         "@_sdata", "@_sdata-8", "@passwd_name+1", "@0x200000", "\\7", "\\-3", '\\"hi"',
         "bogus", "&x", "$none", "%none", "@", "$stack0+1"]
TYPES = ["", ":u8", ":s16", ":x32", ":u64", ":char", ":string", ":ustring", ":symbol",
         ":symstr", ":b3@2/8", ":u8[2]", ":string[2]", ":y9", ":b9@0/8", ":u8[0]"]
HEADS = ["p", "r", "p:grp/ev", "r5:ev", "p:ev", "r:grp-1.ev"]
POINTS = ["do_fork", "vfs_read%return", "do_fork+0", "vfs_read+3", "nosuch", "do_fork%x",
          "example_mod:example_mod_func", "do_sys_open"]

expr = st.recursive(st.sampled_from(BASES), lambda inner: st.builds(
    lambda sign, off, x: f"{sign}{off}({x})", st.sampled_from(["+", "-", "+u"]),
    st.sampled_from(["0", "8", "0x10", "z"]), inner), max_leaves=3)
fetcharg = st.builds(lambda name, e, t: f"{name}{e}{t}",
                     st.sampled_from(["", "a=", "b=", "9x=", "="]), expr, st.sampled_from(TYPES))
definition = st.builds(lambda h, p, args: " ".join([h, p, *args]), st.sampled_from(HEADS),
                       st.sampled_from(POINTS), st.lists(fetcharg, max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(definition, min_size=1, max_size=4))
def test_any_definition_round_trips_or_is_refused_with_a_caret(lines):
    """Whatever the definitions: each is accepted, listed, and the listing reads back to
    itself; or refused, leaving kprobe_events as it was, with a caret inside the command
    (or one past it) and the same entry in error_log; the accepted ones then trace on
    every hit without an oops."""
    async def main():
        async with Machine(cpus=1, seed=3) as m:
            fs = m.tracefs
            for line in lines:
                before = fs.read("kprobe_events")
                try:
                    await fs.write("kprobe_events", line, append=True)
                except TraceProbeError as err:
                    assert 0 <= err.pos <= len(err.command) + 1
                    assert err.command == " ".join(line.split())
                    assert fs.read("error_log").splitlines()[-3].endswith(
                        str(err).splitlines()[0])
                    assert fs.read("kprobe_events") == before
                    continue
                except KprobeError as err:
                    assert err.errno in (errno.EINVAL, errno.ENOENT)
                    assert fs.read("kprobe_events") == before
                    continue
                listing = fs.read("kprobe_events")
                await fs.write("kprobe_events", listing)          # read back whole
                assert fs.read("kprobe_events") == listing
            await fs.write("events/enable", "1") if fs.events() else None
            await m.call("fork_loop", 1)
            await m.call("open_loop", 1, 0)
            await m.call("vfs_read", 0, 0, 1, 0)
            hits = sum(tp.nhit for tp in fs.events())
            assert len(fs.read("trace_pipe").splitlines()) == hits and not m.oopses
            await fs.write("events/enable", "0") if fs.events() else None
            await fs.write("kprobe_events", "")
            assert m.debugfs.read("kprobes/list") == ""
    trio.run(main)

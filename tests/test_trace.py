"""Seeing what happened: the ftrace-style and Perfetto exports of the event trace, the
timeline picture, and tracefs's kprobe_events tracer (`m.tracefs`, `smpkprobes trace`).

Golden files live in tests/golden/; regenerate them after a deliberate change with
    SMPKPROBES_UPDATE_GOLDEN=1 python -m pytest tests/test_trace.py
"""

import errno
import functools
import io
import json
import os
import sys
from pathlib import Path

import pytest
import trio

from smpkprobes import Jprobe, Kprobe, KprobeError, Kretprobe, Machine, jprobe_return
from smpkprobes.tools import _cli
from smpkprobes.tools import _trace_export
from smpkprobes.kprobes._tracefs import ERRORS, TraceProbeError, parse_workloads

GOLDEN = Path(__file__).parent / "golden"
UPDATE = bool(os.environ.get("SMPKPROBES_UPDATE_GOLDEN"))


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    want = path.read_text()
    assert text == want, (f"{name} differs from the golden file; if the change is deliberate, "
                          f"regenerate with SMPKPROBES_UPDATE_GOLDEN=1")


async def known_run(m: Machine) -> None:
    """The seeded run the golden files and the format checks are made from: a kprobe with
    pre and post handlers, a kretprobe, a jprobe, a reentered probe (a miss), and an
    unregistration while the other CPU is still running."""
    kp = Kprobe(symbol_name="do_fork", pre_handler=lambda p, r: 0,
                post_handler=lambda p, r, f: None)
    rp = Kretprobe(symbol_name="do_sys_open", handler=lambda ri, r: None)

    def entry(dfd, filename, flags, mode):
        jprobe_return()
    jp = Jprobe(entry, symbol_name="do_sys_open")
    rec = Kprobe(symbol_name="kprobe_recursed_target",
                 pre_handler=lambda p, r: r.cpu.call("kprobe_recursed_target") and 0)
    await m.kprobes.register_kprobes([kp, rec])
    await m.kprobes.register_kretprobe(rp)
    await m.kprobes.register_jprobe(jp)

    async def cpu1():
        await m.call("sleepy", 1, cpu=1)
        await m.call("fork_loop", 12, cpu=1)
    async with trio.open_nursery() as n:
        n.start_soon(cpu1)
        await m.call("fork_loop", 3, cpu=0)
        await m.call("open_loop", 2, 2, cpu=0)
        await m.call("kprobe_recursed_target", cpu=0)
        await m.sleep_ns(1_000_000)
        await m.call("fork_loop", 1, cpu=0)
        # CPU 1 is still in its fork_loop: the grace period has to wait for it.
        await m.kprobes.unregister_kprobes([kp, rec])
    await m.kprobes.unregister_kretprobe(rp)
    await m.kprobes.unregister_jprobe(jp)
    assert rec.nmissed == 1 and not m.oopses


@pytest.fixture
async def ran():
    async with Machine(cpus=2, seed=10) as m:
        # The golden run shows the trap path's events (steps, boosts, strays): jump
        # optimization, which would take most of its probes off that path, is off.
        await m.sysctl.write("debug/kprobes-optimization", "0")
        await known_run(m)
    return m


# == the ftrace-style export =====================================================================
async def test_ftrace_export_is_stable(ran):
    """The ftrace-style text of a known seeded run is exactly the committed golden file."""
    out = io.StringIO()
    ran.export_ftrace(out)
    check_golden("known_run.ftrace.txt", out.getvalue())


async def test_ftrace_lines_have_the_trace_file_shape(ran):
    """Every line reads `<comm>-<pid> [cpu] seconds.ns: event: body`, the header as ftrace's."""
    import re
    text = _trace_export.ftrace_text(ran)
    head, _, body = text.partition("#              | |         |         |         |\n")
    assert head.startswith("# tracer: smpkprobes\n")
    lines = body.splitlines()
    assert f"entries-in-buffer/entries-written: {len(lines)}/{len(lines)}   #P:2" in head
    shape = re.compile(r" *\S+-\d+ +\[(\d{3}|---)\] +\d+\.\d{9}: \w+: ?.*")
    assert all(shape.fullmatch(line) for line in lines)
    assert any("kprobe_miss: (kprobe_recursed_target+0x0)" in line for line in lines)
    assert any("grace_period_end: gp=1" in line for line in lines)


async def test_ftrace_per_cpu_timestamps_never_go_back(ran):
    """On each CPU the exported timestamps are monotonic, in execution order."""
    last = {}
    for t, _i, cpu, *_ in _trace_export._Timeline(ran).placed:
        if cpu is not None:
            assert t >= last.get(cpu, 0)
            last[cpu] = t


async def test_ftrace_time_order_merges_by_timestamp(ran):
    """order="time" merges the CPUs by timestamp, like the kernel's trace file."""
    lines = _trace_export.ftrace_text(ran, order="time").splitlines()
    stamps = [float(line.split("]", 1)[1].split(":", 1)[0]) for line in lines
              if not line.startswith("#")]
    assert stamps == sorted(stamps)
    with pytest.raises(ValueError, match="order must be"):
        _trace_export.ftrace_text(ran, order="random")


# == the Perfetto / Chrome trace-event export ====================================================
async def test_perfetto_json_follows_the_trace_event_format(ran, tmp_path):
    """The exported JSON loads and follows the trace-event format: known phases, integer
    pid/tid, µs timestamps, X slices properly nested per CPU track, b/e pairs matched."""
    path = tmp_path / "run.json"
    ran.export_perfetto(path)
    doc = json.loads(path.read_text())
    assert doc["displayTimeUnit"] == "ns" and doc["otherData"]["cpus"] == 2
    events = doc["traceEvents"]
    assert {e["ph"] for e in events} == {"M", "X", "i", "b", "e"}
    for e in events:
        assert isinstance(e["name"], str) and e["name"]
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        if e["ph"] != "M":
            assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        if e["ph"] == "X":
            assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0
        if e["ph"] == "i":
            assert e["s"] in ("t", "p", "g")
        if e["ph"] in "be":
            assert "id" in e and "cat" in e
    names = {e["tid"]: e["args"]["name"] for e in events
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {0: "CPU 0", 1: "CPU 1", 2: "kprobes (host)"}
    # µs: the first do_fork hit on CPU 0 is at the trace's ns stamp / 1000.
    t_ns = next(ev[3] for ev in ran.trace if ev[0] == "hit" and ev[1] == 0
                and ran.symbolize(ev[2])[0] == "do_fork")
    first = next(e for e in events if e["ph"] == "X" and e["tid"] == 0
                 and e["name"] == "kprobe do_fork+0x0")
    assert first["ts"] == t_ns / 1000
    # X slices on one track nest or are disjoint; the order of the file is by start.
    for tid in (0, 1):
        xs = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["ph"] == "X" and e["tid"] == tid]
        assert xs == sorted(xs, key=lambda s: s[0])
        open_ = []
        for a, b in xs:
            while open_ and open_[-1] <= a + 1e-9 and not (open_[-1] == a == b):
                open_.pop()
            assert not open_ or b <= open_[-1] + 1e-9, (a, b, open_)
            open_.append(b)
    begins = sorted((e["cat"], e["id"]) for e in events if e["ph"] == "b")
    ends = sorted((e["cat"], e["id"]) for e in events if e["ph"] == "e")
    assert begins == ends and len(begins) == len(set(begins))
    cats = {e.get("cat") for e in events}
    assert {"task", "kprobe", "kretprobe", "handler", "single_step", "grace_period", "text_sync",
            "miss", "stray"} <= cats


async def test_a_boosted_hit_is_one_event_that_expands_to_two():
    """A boosted hit whose pre_handler traces nothing is one "boost" event; `expand` gives
    the "hit" and the boosted "ss" it stands for, as a stepped run would trace them."""
    async with Machine(cpus=1, seed=3, trap_delay=0) as m:
        await m.sysctl.write("debug/kprobes-optimization", "0")     # boosting, not a jump
        kp = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: 0)
        await m.kprobes.register_kprobe(kp)
        await m.call("kprobe_target", 3)
        await m.kprobes.unregister_kprobe(kp)
    [ev] = [ev for ev in m.trace if len(ev) > 2 and ev[2] == kp.addr and ev[0] != "register"
            and ev[0] != "unregister"]
    t = ev[3]
    assert ev == ("boost", 0, kp.addr, t, t)
    assert [e for e in _trace_export.expand(m.trace) if e[0] in ("hit", "ss")] == [
        ("hit", 0, kp.addr, t), ("ss", 0, kp.addr, t, "boost")]


async def test_a_boosted_hit_whose_handler_traces_keeps_two_events():
    """When the pre_handler's own work is traced (here a missed probe in a guest call), the
    hit and its boosted step stay two events around it, in the order they happened."""
    async with Machine(cpus=1, seed=3, trap_delay=0) as m:
        await m.sysctl.write("debug/kprobes-optimization", "0")     # boosting, not a jump
        inner = Kprobe(symbol_name="kprobe_target")
        outer = Kprobe(symbol_name="kprobe_recursed_target",
                       pre_handler=lambda p, r: r.cpu.call("kprobe_target", 3) and 0)
        await m.kprobes.register_kprobes([inner, outer])
        await m.call("kprobe_recursed_target")
        await m.kprobes.unregister_kprobes([inner, outer])
    kinds = [(ev[0], ev[2]) for ev in m.trace if ev[0] in ("hit", "ss", "miss", "boost")]
    assert kinds == [("hit", outer.addr), ("miss", inner.addr), ("ss", inner.addr),
                     ("ss", outer.addr)]
    assert inner.nmissed == 1


async def test_timeline_slices_nest_hits_in_tasks(ran):
    """Each probe hit lies inside a task slice of its CPU; each handler inside a hit."""
    tl = _trace_export._Timeline(ran)
    tasks = [s for s in tl.slices if s.cat == "task"]
    hits = [s for s in tl.slices if s.cat == "kprobe" and s.depth == 1]
    assert len(hits) == sum(1 for ev in _trace_export.expand(ran.trace) if ev[0] == "hit")
    for h in hits:
        assert any(t.track == h.track and t.start <= h.start and h.end <= t.end for t in tasks)
    steps = [s for s in tl.slices if s.cat == "single_step"]
    assert {s.args["how"] for s in steps} >= {"out of line", "boosted"}
    gps = [s for s in tl.spans if s.cat == "grace_period"]
    assert [g.id for g in gps] == [1, 2, 3] and all(g.start <= g.end for g in gps)


# == pictures =====================================================================================
async def test_plot_timeline_writes_a_png(ran, tmp_path):
    """plot_timeline draws a PNG of the run."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "timeline.png"
    _trace_export.plot_timeline(ran, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plot_curves_writes_a_png(tmp_path):
    """plot_curves draws one curve per key (nmissed against maxactive per CPU count)."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    _trace_export.plot_curves({"2 CPUs": [(1, 5), (2, 1), (4, 0)],
                               "4 CPUs": [(1, 9), (2, 4), (4, 0)]}, path,
                              "maxactive", "nmissed", "kretprobe misses", logx=True)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, capsys):
    """Without matplotlib, --plot stops before the run with the pip command to fix it."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(_trace_export.PlotUnavailable, match=r"pip install 'smpkprobes\[plot\]'"):
        _trace_export.require_matplotlib()
    assert _cli.main(["run", "kprobe_example", "--plot", "x.png"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_run_scenario_writes_all_three(tmp_path, capsys):
    """`smpkprobes run SCENARIO --trace --perfetto --plot` writes the three files."""
    pytest.importorskip("matplotlib")
    files = [tmp_path / n for n in ("t.txt", "p.json", "t.png")]
    rc = _cli.main(["run", "kprobe_example", "--cpus", "2", "--size", "2", "--quiet",
                    "--trace", str(files[0]), "--perfetto", str(files[1]),
                    "--plot", str(files[2])])
    assert rc == 0
    assert "kprobe_hit: (do_fork+0x0)" in files[0].read_text()
    assert json.loads(files[1].read_text())["traceEvents"]
    assert files[2].read_bytes()[:4] == b"\x89PNG"
    assert "Perfetto trace written to" in capsys.readouterr().err


# == tracefs: kprobe_events ========================================================================
@pytest.fixture
async def m():
    async with Machine(cpus=2, seed=3) as machine:
        yield machine


async def test_kprobe_events_trace_known_run(m):
    """The tracefs `trace` file of a seeded one-liner session is the committed golden file.
    (Recorded with trap-based probes: optimization off, so the golden keeps its timing.)"""
    await m.sysctl.write("debug/kprobes-optimization", "0")
    fs = m.tracefs
    await fs.write("kprobe_events", "p:myfork do_fork flags=$arg1:x64 comm=$comm\n"
                                    "r:openret do_sys_open ret=$retval:s32 "
                                    "name=+0($arg2):string")
    await fs.write("events/kprobes/enable", "1")
    async with trio.open_nursery() as n:
        for cpu in range(2):
            n.start_soon(functools.partial(m.call, "fork_loop", 2, cpu=cpu))
            n.start_soon(functools.partial(m.call, "open_loop", 3, 3, cpu=cpu))
    check_golden("kprobe_events.trace.txt", fs.read("trace"))


async def test_kprobe_events_lists_and_registers_disabled(m):
    """A definition registers its probe at once, disabled; kprobe_events lists it as the kernel
    does, with generated event and argument names."""
    fs = m.tracefs
    await fs.write("kprobe_events", "p do_fork %di\n r10:mygrp/r_open do_sys_open $retval")
    await fs.write("kprobe_events", f"p:at {m.kallsyms_lookup_name('vfs_read'):#x}", append=True)
    assert fs.read("kprobe_events") == (
        "p:kprobes/p_do_fork_0 do_fork arg1=%di\n"
        "r10:mygrp/r_open do_sys_open arg1=$retval\n"
        f"p:kprobes/at 0x{m.kallsyms_lookup_name('vfs_read'):x}\n")
    listed = m.debugfs.read("kprobes/list")
    assert listed.count("[DISABLED]") == 3
    assert [ev.probe.maxactive for ev in fs.events() if ev.d.is_return] == [10]
    assert fs.read("events/enable") == "0\n"
    await fs.write("events/mygrp/enable", "1")
    assert fs.read("events/enable") == "X\n" and fs.read("events/mygrp/r_open/enable") == "1\n"
    assert "[DISABLED]" not in m.debugfs.read("kprobes/list").splitlines()[1]


async def test_fetchargs_types_and_dereferences(m):
    """u/s/x types truncate and sign-extend, +OFFS() and @SYM dereference, string reads a C
    string, $stackN and $comm fetch what they name."""
    fs = m.tracefs
    await fs.write("kprobe_events",
                   "p:f do_fork a=$arg1:u8 b=%rdi:s8 c=$arg1:x16 s0=$stack0 me=$comm "
                   "g=@do_fork:x8\n"
                   "p:o do_sys_open dfd=%di:s32 d2=$arg1:s64 name=+0($arg2):string "
                   "c1=+1($arg2):u8 ra=+0(%sp) n=+0(+0(%sp)):x8 bad=+0($arg4):string")
    await fs.write("events/enable", "1")
    await m.call("fork_loop", 1, cpu=0)
    await m.call("open_loop", 1, 0, cpu=0)
    lines = fs.read("trace_pipe").splitlines()
    s0 = lines[0].split("s0=")[1].split()[0]
    assert m.symbolize(int(s0, 16))[0] == "fork_loop"          # do_fork's return address
    # @do_fork reads the probed byte as memory holds it: the breakpoint, as in the kernel.
    assert lines[0].endswith(f'f: (do_fork+0x0) a=17 b=17 c=0x11 s0={s0} me="fork_loop" '
                             f"g=0x{m.backend.breakpoint[0]:x}")
    # An int argument read as s64 keeps the zero-extended upper half, as in the kernel;
    # +0(+0(%sp)) is the first byte of the instruction do_sys_open returns to.
    ra = int(lines[1].split(" ra=")[1].split()[0], 16)
    assert m.symbolize(ra)[0] == "sys_open"
    assert lines[1].endswith('o: (do_sys_open+0x0) dfd=-100 d2=4294967196 name="/etc/passwd" '
                             f'c1=101 ra={ra:#x} n={m.read_memory(ra, 1)[0]:#x} bad=(fault)')
    assert fs.read("trace_pipe") == ""           # consumed
    assert len(fs.read("trace").splitlines()) == 6 + 2


async def test_retprobe_args_are_fetched_at_entry(m):
    """$argN in a return probe is the argument the function was called with."""
    fs = m.tracefs
    await fs.write("kprobe_events", "r:k kprobe_target v=$arg1:u32 r=$retval:u32")
    await fs.write("events/kprobes/k/enable", "1")
    assert await m.call("kprobe_target", 300) == 100
    assert fs.read("trace_pipe") == ("   kprobe_target-1       [000]     0.000000100: k: "
                                     "(__hc_task_return+0x0 <- kprobe_target) v=300 r=100\n")


async def test_enable_delete_and_clear(m):
    """Enabled events cannot be deleted or cleared (EBUSY); disabled ones can, which
    unregisters their probes; tracing_on stops recording; kprobe_profile counts hits."""
    fs = m.tracefs
    await fs.write("kprobe_events", "p:a do_fork\np:b vfs_read")
    await fs.write("events/kprobes/a/enable", "1")
    with pytest.raises(KprobeError) as e:
        await fs.write("kprobe_events", "-:a", append=True)
    assert e.value.errno == errno.EBUSY
    with pytest.raises(KprobeError, match="EBUSY"):
        await fs.write("kprobe_events", "")
    await m.call("fork_loop", 2)
    await fs.write("tracing_on", "0")
    await m.call("fork_loop", 1)
    await fs.write("tracing_on", "1")
    assert len(fs.read("trace_pipe").splitlines()) == 2
    assert fs.read("kprobe_profile").split() == ["a", "3", "0", "b", "0", "0"]
    await fs.write("kprobe_events", "-:b", append=True)
    await fs.write("events/kprobes/a/enable", "0")
    await fs.write("kprobe_events", "-:kprobes/a", append=True)
    assert fs.read("kprobe_events") == "" and m.debugfs.read("kprobes/list") == ""
    with pytest.raises(KprobeError, match="ENOENT"):
        fs.read("events/kprobes/a/enable")
    with pytest.raises(KprobeError, match="takes 0 or 1"):
        await fs.write("tracing_on", "yes")


async def test_missed_hits_are_counted_in_the_profile(m):
    """A kprobe event hit from inside a handler is missed, and kprobe_profile says so."""
    fs = m.tracefs
    await fs.write("kprobe_events", "p:t kprobe_recursed_target")
    await fs.write("events/enable", "1")
    kp = Kprobe(symbol_name="kprobe_recursed_target",
                pre_handler=lambda p, r: r.cpu.call("kprobe_recursed_target") and 0)
    await m.kprobes.register_kprobe(kp)
    await m.call("kprobe_recursed_target")
    assert fs.read("kprobe_profile").split() == ["t", "1", "1"]


# One malformed line per error: (line, error_log code, the caret's 1-based column).  The
# columns are the kernel's (trace_kprobe.c, trace_probe.c); tests/test_kprobe_syntax_errors.py
# ports the kernel's own selftest of them.
BAD = [
    ("p5:x do_fork", "BAD_MAXACT_TYPE", 2),
    ("r0:x do_fork", "BAD_MAXACT", 2),
    ("r99999:x do_fork", "MAXACT_TOO_BIG", 2),
    ("p:/x do_fork", "NO_GROUP_NAME", 3),
    ("p:1grp/x do_fork", "BAD_GROUP_NAME", 3),
    ("p: do_fork", "NO_EVENT_NAME", 3),
    ("p:my-ev do_fork", "BAD_EVENT_NAME", 3),
    ("p:" + "e" * 64 + " do_fork", "EVENT_TOO_LONG", 3),
    ("p:x no_such_function", "BAD_PROBE_ADDR", 5),
    ("p:x do_fork+zz", "BAD_PROBE_ADDR", 5),
    ("p:x do_fork+1x", "BAD_PROBE_ADDR", 5),
    ("p:x do_fork-1", "BAD_PROBE_ADDR", 5),
    ("p:x 0xzz", "BAD_PROBE_ADDR", 5),
    ("r:x do_fork+1", "BAD_RETPROBE", 5),
    ("p:x do_fork%retur", "BAD_ADDR_SUFFIX", 12),
    ("p:x do_page_fault", "FAIL_REG_PROBE", 5),
    ("p:x jprobe_return", "FAIL_REG_PROBE", 5),
    ("p:x do_fork a=%rdi a=%rsi", "USED_ARG_NAME", 20),
    ("p:x do_fork common_pid=%rdi", "USED_ARG_NAME", 13),
    ("p:x do_fork =%rdi", "NO_ARG_NAME", 13),
    ("p:x do_fork 9a=%rdi", "BAD_ARG_NAME", 13),
    ("p:x do_fork " + "a" * 33 + "=%rdi", "ARG_NAME_TOO_LONG", 13),
    ("p:x do_fork a=", "NO_ARG_BODY", 15),
    ("p:x do_fork a=%rdi:u7", "BAD_TYPE", 20),
    ("p:x do_fork a=%rdi:", "BAD_TYPE", 20),
    ("p:x do_fork a=%rdi:string", "BAD_STRING", 20),
    ("p:x do_fork a=%rdi:u8[2]", "BAD_STRING", 20),
    ("p:x do_fork a=$comm:u32", "NEED_STRING_TYPE", 21),
    ("p:x do_fork a=$comm:string[2]", "NEED_STRING_TYPE", 21),
    ("p:x do_fork a=%zz", "BAD_REG_NAME", 15),
    ("p:x do_fork $retval", "RETVAL_ON_PROBE", 13),
    ("r:x 0x100000 $retval", "RETVAL_ON_PROBE", 14),     # no TPARG_FL_RETURN for an address
    ("r:x 0x100000 $arg1", "NOFENTRY_ARGS", 14),
    ("p:x do_fork $arg0", "BAD_ARG_NUM", 13),
    ("p:x do_fork $arg10000", "BAD_ARG_NUM", 13),
    ("p:x do_fork $argx", "BAD_VAR", 13),
    ("p:x do_fork+1 $arg1", "NOFENTRY_ARGS", 15),
    ("p:x do_fork+1 a=$arg1", "NOFENTRY_ARGS", 17),
    ("p:x do_fork $stackx", "BAD_VAR", 13),
    ("p:x do_fork $stack0+10", "BAD_VAR", 13),
    ("p:x do_fork $stack10000", "BAD_STACK_NUM", 13),
    ("p:x do_fork $foo", "BAD_VAR", 13),
    ("p:x do_fork @no_such", "BAD_PROBE_ADDR", 5),       # resolved when it registers
    ("p:x do_fork @do_fork*10", "BAD_PROBE_ADDR", 5),
    ("p:x do_fork +8%rdi", "DEREF_NEED_BRACE", 13),
    ("p:x do_fork +z(%rdi)", "BAD_DEREF_OFFS", 13),
    ("p:x do_fork +(%rdi)", "BAD_DEREF_OFFS", 13),
    ("p:x do_fork +8(%rdi", "DEREF_OPEN_BRACE", 20),
    ("p:x do_fork +8()", "BAD_FETCH_ARG", 16),
    ("p:x do_fork (%rdi)", "BAD_FETCH_ARG", 13),
    ("p:x do_fork +0($comm)", "COMM_CANT_DEREF", 16),
    ("p:x do_fork +0(\\\"s\")", "COMM_CANT_DEREF", 16),
    ("p:x do_fork a=\\x", "BAD_IMM", 16),
    ("p:x do_fork a=\\\"x", "IMMSTR_NO_CLOSE", 18),
    ("p:x do_fork rdi", "NOSUP_BTFARG", 13),
    ("p:x do_fork " + "+0(" * 13 + "@do_fork" + ")" * 13, "TOO_MANY_OPS", 16),
    ("p:x do_fork " + "+1(" * 20 + "%rdi" + ")" * 20, "ARG_TOO_LONG", 13),
    ("p:x do_fork %rdi:b9@0/8", "BAD_BITFIELD", 18),
    ("p:x do_fork %rdi:b0@0/8", "BAD_BITFIELD", 18),
    ("p:x do_fork %rdi:b1@0/12", "BAD_TYPE", 18),
    ("p:x do_fork " + " ".join(f"a{i}=%rdi" for i in range(129)), "TOO_MANY_ARGS", 13),
]


@pytest.mark.parametrize("line,code,column", BAD, ids=[b[1] + ":" + b[0][:24] for b in BAD])
async def test_bad_definition_logs_the_kernel_error(m, line, code, column):
    """Each malformed kprobe_events line is refused with the kernel's text, errno and caret
    column, in the exception and in error_log, and leaves nothing defined."""
    with pytest.raises(TraceProbeError) as e:
        await m.tracefs.write("kprobe_events", line)
    err = e.value
    assert (err.code, err.column, err.reason) == (code, column, ERRORS[code][1])
    # A symbol that is not there (the probe point's, found by validate_probe_symbol, or an
    # @SYM argument's, when the probe registers) is the kernel's -ENOENT; a bad offset is
    # the -EINVAL of the table.
    missing = line.split()[-1].lstrip("@") in ("no_such_function", "0xzz", "no_such",
                                               "do_fork*10")
    want = errno.ENOENT if code == "BAD_PROBE_ADDR" and missing else ERRORS[code][0]
    assert isinstance(err, KprobeError) and err.errno == want
    head, command, caret = str(err).splitlines()
    assert head == f"trace_kprobe: error: {ERRORS[code][1]}"
    assert command == f"  Command: {line}" and caret == " " * (10 + column) + "^"
    assert m.tracefs.read("error_log").splitlines()[-2:] == [command, caret]
    assert m.tracefs.read("kprobe_events") == "" and m.debugfs.read("kprobes/list") == ""


@pytest.mark.parametrize("line,errno_", [
    ("q:x do_fork", errno.EINVAL), ("p:x", errno.EINVAL), ("p", errno.EINVAL),
    ("-:nosuch", errno.ENOENT), ("-x", errno.EINVAL), ("-:grp/", errno.EINVAL),
    ("p:x 0x10000/a:b", errno.EINVAL)])
async def test_commands_the_kernel_refuses_without_a_log(m, line, errno_):
    """Not a p/r/- command, no probe point, a uprobe, a delete of nothing: the kernel returns
    an errno and writes nothing to error_log."""
    with pytest.raises(KprobeError) as e:
        await m.tracefs.write("kprobe_events", line)
    assert e.value.errno == errno_ and not isinstance(e.value, TraceProbeError)
    assert m.tracefs.read("error_log") == ""


async def test_odd_heads_the_kernel_accepts(m):
    """`px` is a probe with a generated name and `rx1:x` a return probe named x: the kernel
    reads maxactive only when a digit follows the type letter."""
    await m.tracefs.write("kprobe_events", "px do_fork\nrx1:x do_fork")
    assert m.tracefs.read("kprobe_events") == ("p:kprobes/p_do_fork_0 do_fork\n"
                                               "r:kprobes/x do_fork\n")


async def test_a_second_definition_of_an_event_adds_a_probe(m):
    """A second `p:x` on another function joins event x (a multi-probe event); another group
    may reuse the name."""
    await m.tracefs.write("kprobe_events", "p:x do_fork")
    await m.tracefs.write("kprobe_events", "p:x vfs_read", append=True)
    await m.tracefs.write("kprobe_events", "p:other/x vfs_read", append=True)
    assert m.tracefs.read("kprobe_events") == ("p:kprobes/x do_fork\np:kprobes/x vfs_read\n"
                                               "p:other/x vfs_read\n")
    assert len(m.tracefs.events()) == 3


# == smpkprobes trace ================================================================================
def test_trace_command_prints_lines_as_they_happen(capsys):
    """The one-liner of the issue prints one line per hit and a summary on stderr."""
    rc = _cli.main(["trace", "p:myfork do_fork flags=$arg1:x64",
                    "r:openret do_sys_open ret=$retval:s32", "--workload", "fork_loop,open_loop",
                    "--cpus", "4", "--loops", "3"])
    out, err = capsys.readouterr()
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 24
    assert sum("myfork: (do_fork+0x0) flags=0x11" in line for line in lines) == 12
    assert sum(line.endswith("ret=-2") for line in lines) == 4
    assert {line.split("[")[1][:3] for line in lines} == {"000", "001", "002", "003"}
    assert "kprobes/myfork 12 hits, 0 missed" in err


def test_trace_command_reports_a_bad_definition(capsys):
    """A bad definition ends the command with status 2 and the kernel's error, one line."""
    assert _cli.main(["trace", "p:x do_fork $arg0", "--cpus", "1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "smpkprobes: error: bad kprobe_events definition in 'p:x do_fork $arg0': EINVAL: "
        "Invalid argument number at column 13 ('$arg0') (fix that DEFINITION; `smpkprobes trace "
        "--help` gives the syntax)"]


def test_parse_workloads():
    """Known workloads get default arguments; others take theirs after colons."""
    assert parse_workloads("fork_loop,open_loop:4:2,fib", 7) == [
        ("fork_loop", (7,)), ("open_loop", (4, 2)), ("fib", (10,))]
    with pytest.raises(ValueError, match="integers"):
        parse_workloads("fib:x", 1)


def test_trace_command_takes_every_new_form(capsys):
    """%return, MOD:SYM (the module is loaded for it), multi-probe events, immediates,
    bitfields and arrays all pass through `smpkprobes trace` as tracefs takes them."""
    rc = _cli.main(["trace", "p:ret do_sys_open%return r=$retval:s32 one=\\1",
                    "p:kprobes/both do_fork v=$arg1:u8", "p:kprobes/both vfs_read v=$arg3:u8",
                    "p:path do_sys_open c=+0($arg2):char[2] hi=+0($arg2):b4@4/8",
                    "r:modr example_mod:example_mod_func v=$retval:s64",
                    "--workload", "open_loop:1:0,fork_loop:1,vfs_read:0:0:9:0,example_mod_func:1",
                    "--cpus", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    bodies = sorted(line.split(": ", 1)[1] for line in out.splitlines())
    assert bodies == sorted([
        "ret: (sys_open+0x15 <- do_sys_open) r=3 one=0x1",
        "both: (do_fork+0x0) v=17", "both: (vfs_read+0x0) v=9",
        "path: (do_sys_open+0x0) c={'/','e'} hi=2",
        "modr: (__hc_task_return+0x0 <- example_mod_func) v=2"])


def test_trace_command_names_a_missing_module(capsys):
    assert _cli.main(["trace", "p nosuchmod:f", "--cpus", "1"]) == 2
    assert "no module 'nosuchmod' for x86_64" in capsys.readouterr().err

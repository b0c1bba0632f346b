"""The benchmarks run (tiny sizes): figures are not asserted here, only that every row is
measured.  The targets live in `smpkprobes bench`'s output and the closing notes."""

import math

from smpkprobes.tools import _bench


def test_bench_machine_rows():
    rows = _bench.bench_machine(n=2_000, cpu_counts=(1, 2), repeat=1)
    assert [r["config"] for r in rows] == ["bare Unicorn, one emu_start", "machine, 1 CPU(s)",
                                           "machine, 2 CPU(s)"]
    assert all(r["ips"] > 0 and r["ratio"] > 0 for r in rows)


def test_bench_kprobe_rows():
    from smpkprobes.machine import _codehook
    rows = _bench.bench_kprobe(n=3_000, others=40)
    assert len(rows) == (10 if _codehook.hook_route() == "c" else 9)
    assert rows[0]["ratio"] == 1.0
    for r in rows[1:6]:
        assert r["us"] > 0 and r["ratio"] > 0, r
    assert math.isnan(rows[6]["us"]) and rows[6]["ratio"] > 0
    # The optimized hit is cheap enough for noise to swamp it at this size: measured, only.
    assert rows[7]["what"] == "kprobe hit, empty pre_handler (jump-optimized)"
    assert math.isfinite(rows[7]["us"])
    # The dispatch rows: the same empty callback reached without the binding's wrappers.
    assert rows[8]["what"] == "empty code hook dispatched as a raw ctypes callback"
    if len(rows) == 10:
        assert rows[9]["what"] == "empty code hook dispatched in C (the optimized hit's entry)"
    assert all(math.isfinite(r["us"]) for r in rows[8:])


def test_overhead_table_marks_each_target_met_or_not(capsys):
    """Under the overhead table, every target of every arch is marked met or NOT met."""
    rows = {"x86_64": {"k": 1.0, "k (stepped)": 2.0, "j": 3.0, "r": 4.0, "kr": 4.2, "jr": 5.0,
                       "o": 0.25, "ro": 3.0}}
    _bench.print_overhead(rows, 0.5)
    targets = [ln.strip() for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("target ")]
    assert targets == ["target x86_64: j <= 1.75 x k: measured 1.50 x k: met",
                       "target x86_64: r <= 1.75 x k: measured 2.00 x k: NOT met",
                       "target x86_64: kr <= 1.1 x r: measured 1.05 x r: met",
                       "target x86_64: o <= kb / 3: measured 0.25 x kb: met",
                       "target x86_64: ro <= 0.5 x r: measured 0.75 x r: NOT met"]


def test_the_optimized_columns_are_not_applicable_where_linux_has_no_optprobes(capsys):
    """arm64 and sparc64 take a trap for every probe, as Linux's do: their o and ro
    columns are kb and r again, and no target is claimed (met or missed) for them."""
    row = {"k": 1.0, "k (stepped)": 2.0, "j": 3.0, "r": 4.0, "kr": 4.2, "jr": 5.0,
           "o": 1.0, "ro": 4.0}
    _bench.print_overhead({"arm64": row, "sparc64": row, "arm": row}, 0.5)
    targets = [ln.strip() for ln in capsys.readouterr().out.splitlines()
               if ln.strip().startswith("target ") and ("o <=" in ln or "o and ro" in ln)]
    assert targets == [
        "target arm64: o and ro: not applicable (no optprobes on arm64, as in Linux: o and "
        "ro are the trap-based kb and r)",
        "target sparc64: o and ro: not applicable (no optprobes on sparc64, as in Linux: o "
        "and ro are the trap-based kb and r)",
        "target arm: o <= kb / 3: measured 1.00 x kb: NOT met",
        "target arm: ro <= 0.5 x r: measured 1.00 x r: NOT met"]

"""Benchmarks (`smpkprobes bench`).  Figures, not pass/fail tests: each target is printed
under its measurements, marked met or NOT met (the exit status stays 0: a busy host is not a
bug).  Host time is used here, and only here, to measure the host: wall-clock for the
machine's throughput, CPU time of this process for the cost of a hit."""

from __future__ import annotations

import functools
import gc
import time

import trio
import unicorn

from ..machine import _memory as mem
from ..machine._kernel import IMAGES, Image, Kallsyms
from .._system import Machine


def _bare(arch: str = "x86_64"):
    """A bare Unicorn instance with the default kernel loaded, and a way to call a function."""
    from smpkprobes.cpus import get_backend
    b = get_backend(arch)
    memory = mem.PhysicalMemory()
    img = Image.load(IMAGES / arch / "vmlinux")
    for addr, data, memsz in img.segments:
        memory.write(addr, data)
    ks = Kallsyms()
    ks.add(img.symbols)
    uc = unicorn.Uc(b.unicorn.uc_arch, b.unicorn.uc_mode)
    memory.map_into(uc)
    ret = ks.lookup("__hc_task_return").addr

    class Access:
        def read(self, r): return uc.reg_read(b.registers[r])
        def write(self, r, v): uc.reg_write(b.registers[r], v)
        def read_word(self, a): return int.from_bytes(memory.read(a, b.word_bytes), b.endian)
        def write_word(self, a, v): memory.write(a, v.to_bytes(b.word_bytes, b.endian))

    def call(name, *args):
        b.cc.setup_call(Access(), mem.STACKS.start + mem.STACK_SIZE, ks.lookup(name).addr, args, ret)
        uc.emu_start(ks.lookup(name).addr, ret)
        return uc.reg_read(b.registers[b.cc.ret_reg])
    return uc, ks, call, memory


def _insns_per_call(arch: str, func: str, arg: int) -> int:
    uc, ks, call, _ = _bare(arch)
    counter = [0]
    uc.hook_add(unicorn.UC_HOOK_CODE, lambda *a: counter.__setitem__(0, counter[0] + 1))
    call(func, arg)
    return counter[0]


def bench_machine(arch: str = "x86_64", n: int = 200_000, cpu_counts=(1, 2, 4, 8),
                  repeat: int = 3) -> list[dict]:
    """Guest instructions per second on `bench_loop(n)` on every CPU, beside one bare
    Unicorn instance running the same call.  Each figure is the best of `repeat` runs, each
    run after a full garbage collection (freeing an earlier machine's Unicorn instances
    inside a timed run costs milliseconds)."""
    per_call = _insns_per_call(arch, "bench_loop", n)
    uc, ks, call, _ = _bare(arch)

    def best(timed) -> float:
        times = []
        for _ in range(repeat):
            gc.collect()
            times.append(timed())
        return min(times)

    def bare_once() -> float:
        t = time.perf_counter()
        call("bench_loop", n)
        return time.perf_counter() - t

    bare_ips = per_call / best(bare_once)
    rows = [{"config": "bare Unicorn, one emu_start", "ips": bare_ips, "ratio": 1.0}]

    async def run(ncpu):
        async with Machine(arch=arch, cpus=ncpu, seed=1) as m:
            t0 = time.perf_counter()
            async with trio.open_nursery() as nurs:
                for c in range(ncpu):
                    nurs.start_soon(functools.partial(m.call, "bench_loop", n, cpu=c))
            return time.perf_counter() - t0

    for ncpu in cpu_counts:
        dt = best(lambda: trio.run(run, ncpu))
        ips = ncpu * per_call / dt
        rows.append({"config": f"machine, {ncpu} CPU(s)", "ips": ips, "ratio": ips / bare_ips})
    return rows


# The per-hit figures below are CPU time of this process (the host is shared: wall-clock time
# would charge a hit for the other processes that ran meanwhile); machine throughput above is
# wall-clock.
_cpu_time = time.process_time


def code_hook_cost(kind: str = "binding", n: int = 20_000, arch: str = "x86_64") -> float:
    """Microseconds per hit of an empty Python code-hook callback on bench_target, on a bare
    instance of `arch`, reached one of three ways: "binding" (the binding's `hook_add`: the
    yardstick), "ctypes" (a raw ctypes callback) or "c" (the C dispatch of
    machine/_codehook.py, which the optimized hit's entry uses)."""
    import ctypes

    from unicorn.unicorn_py3.unicorn import HOOK_CODE_CFUNC, uc_hook_h, uclib

    from ..machine import _codehook

    uc, ks, call, _ = _bare(arch)
    target = ks.lookup("bench_target").addr
    plain = float("inf")
    for _ in range(2):
        t = _cpu_time()
        call("bench_loop", n)
        plain = min(plain, _cpu_time() - t)
    keep = []
    if kind == "binding":
        uc.hook_add(unicorn.UC_HOOK_CODE, lambda *a: None, None, target, target)
    else:
        if kind == "ctypes":
            fptr, user = HOOK_CODE_CFUNC(lambda *a: None), ctypes.c_void_p(0)
        else:
            fptr, ctx = _codehook.code_hook(lambda addr: False, lambda exc: True, lambda: None)
            keep.append(ctx)
            user = ctypes.c_void_p(ctypes.addressof(ctx))
        keep.append(fptr)
        handle = uc_hook_h()
        uclib.uc_hook_add(uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_CODE, fptr, user,
                          ctypes.c_uint64(target), ctypes.c_uint64(target))
    uc.ctl_flush_tb()       # code translated before the hook was added would skip it
    call("bench_loop", 10)
    hooked = float("inf")
    for _ in range(3):
        t = _cpu_time()
        call("bench_loop", n)
        hooked = min(hooked, _cpu_time() - t)
    return (hooked - plain) / n * 1e6


def bare_hook_cost(n: int = 20_000) -> float:
    """Microseconds for one no-op Python UC_HOOK_CODE callback on a bare x86_64 instance."""
    return code_hook_cost("binding", n)


def dispatch_costs(n: int = 20_000) -> dict[str, float]:
    """code_hook_cost without the binding's wrappers: "ctypes", and "c" where the extension
    was built."""
    from ..machine import _codehook
    kinds = ["ctypes"] + (["c"] if _codehook.hook_route() == "c" else [])
    return {kind: code_hook_cost(kind, n) for kind in kinds}


def bench_kprobe(arch: str = "x86_64", n: int = 20_000, others: int = 10_000) -> list[dict]:
    from ..kprobes._core import Kprobe
    hook_cost = code_hook_cost("binding", n, arch) / 1e6

    async def timed(m, func="bench_loop"):
        t0 = _cpu_time()
        await m.call(func, n, cpu=0)
        return _cpu_time() - t0

    async def run():
        out = {}
        async with Machine(arch=arch, cpus=1, seed=1, trap_delay=0) as m:
            # The trap-based rows first: jump optimization off until the optimized row.
            await m.sysctl.write("debug/kprobes-optimization", "0")
            base = min([await timed(m) for _ in range(3)])
            kp = Kprobe(symbol_name="bench_target", pre_handler=lambda p, r: 0)
            await m.kprobes.register_kprobe(kp)
            out["boosted"] = (min([await timed(m) for _ in range(3)]) - base) / n
            # Unicorn's share: the same int3 trap with a callback that only reads the PC,
            # looks up where to go and writes it (the probe core's work left out).
            cpu, site = m.cpus[0], m.kprobes.get_kprobe(kp.addr)
            where = {kp.addr: site.boost_resume}
            sink = cpu.trap_sink
            cpu.trap_sink = lambda _cpu, addr: where[addr]
            out["floor"] = (min([await timed(m) for _ in range(3)]) - base) / n
            cpu.trap_sink = sink
            await m.kprobes.unregister_kprobe(kp)
            kp = Kprobe(symbol_name="bench_target", pre_handler=lambda p, r: 0,
                        post_handler=lambda p, r, f: None)
            await m.kprobes.register_kprobe(kp)
            out["stepped"] = (min([await timed(m) for _ in range(3)]) - base) / n
            await m.kprobes.unregister_kprobe(kp)
            # The probe-free time again, warm, just before: the ratio below compares like
            # with like (measured only at the start it read 0.92-0.97).
            base = min([base] + [await timed(m) for _ in range(3)])
            # 10,000 other probes, on every instruction boundary outside the bench code.
            spots = []
            for s in m.kallsyms.functions():
                if s.name.startswith("bench_") or s.addr >= m.kprobes_text[0] \
                        or s.name in ("do_page_fault", "notifier_call_chain"):
                    continue
                spots.extend(sorted(m.kprobes._insn_boundaries(s)))
            probes = []
            for i in range(others):
                p = Kprobe(addr=spots[i % len(spots)], pre_handler=lambda p, r: 0)
                try:
                    await m.kprobes.register_kprobe(p)
                    probes.append(p)
                except OSError:
                    pass
            out["registered_others"] = len(probes)
            base2 = min([await timed(m) for _ in range(3)])
            out["probe_free_ratio"] = base2 / base
            kp = Kprobe(symbol_name="bench_target", pre_handler=lambda p, r: 0)
            await m.kprobes.register_kprobe(kp)
            out["boosted_10k"] = (min([await timed(m) for _ in range(3)]) - base2) / n
            await m.kprobes.unregister_kprobes(probes + [kp])
            # Jump-optimized: the same probe hit through its detour, no trap.
            await m.sysctl.write("debug/kprobes-optimization", "1")
            base3 = min([await timed(m) for _ in range(3)])
            out["base_after"] = base3 / base
            kp = Kprobe(symbol_name="bench_target", pre_handler=lambda p, r: 0)
            await m.kprobes.register_kprobe(kp)
            await m.kprobes.optimizer.wait_for_kprobe_optimizer()
            out["optimized"] = (min([await timed(m) for _ in range(3)]) - base3) / n
            await m.kprobes.unregister_kprobe(kp)
        # The default configuration: 1 trap in 16 is handled in the CPU's next quantum.
        async with Machine(arch=arch, cpus=1, seed=1) as m:
            await m.sysctl.write("debug/kprobes-optimization", "0")
            out["trap_delay"] = m.trap_delay
            base = min([await timed(m) for _ in range(3)])
            kp = Kprobe(symbol_name="bench_target", pre_handler=lambda p, r: 0)
            await m.kprobes.register_kprobe(kp)
            out["boosted_default"] = (min([await timed(m) for _ in range(3)]) - base) / n
            await m.kprobes.unregister_kprobe(kp)
        return out
    r = trio.run(run)
    d = dispatch_costs(n)
    return [
        {"what": "bare UC_HOOK_CODE callback", "us": hook_cost * 1e6, "ratio": 1.0},
        {"what": "int3 + PC redirect alone (no probe core: Unicorn's share)",
         "us": r["floor"] * 1e6, "ratio": r["floor"] / hook_cost},
        {"what": "kprobe hit, empty pre_handler (boosted)", "us": r["boosted"] * 1e6,
         "ratio": r["boosted"] / hook_cost},
        {"what": "kprobe hit, pre+post (stepped)", "us": r["stepped"] * 1e6,
         "ratio": r["stepped"] / hook_cost},
        {"what": f"kprobe hit (boosted), default trap_delay {r['trap_delay']:.4g}",
         "us": r["boosted_default"] * 1e6, "ratio": r["boosted_default"] / hook_cost},
        {"what": f"boosted hit with {r['registered_others']} other probes", "us": r["boosted_10k"] * 1e6,
         "ratio": r["boosted_10k"] / r["boosted"]},
        {"what": f"probe-free loop with {r['registered_others']} probes elsewhere (time ratio)",
         "us": float("nan"), "ratio": r["probe_free_ratio"]},
        {"what": "kprobe hit, empty pre_handler (jump-optimized)", "us": r["optimized"] * 1e6,
         "ratio": r["optimized"] / hook_cost},
    ] + [{"what": f"empty code hook dispatched {how}", "us": us, "ratio": us / (hook_cost * 1e6)}
         for how, us in ((("as a raw ctypes callback", d["ctypes"]),) +
                         ((("in C (the optimized hit's entry)", d["c"]),) if "c" in d else ()))]


def bench_overhead(arch: str = "x86_64", n: int = 10_000) -> dict[str, float]:
    """The kprobes document's overhead table for this machine: microseconds of host time per
    hit on bench_target, for k (kprobe), j (jprobe), r (return probe), kr and jr, plus the
    stepped (unboosted) kprobe.  Each figure is (probed - unprobed) / hits, best of three."""
    from ..kprobes._core import Jprobe, Kprobe, Kretprobe, jprobe_return

    def j_entry(x):
        jprobe_return()

    def configs():
        yield "k", lambda: [Kprobe(symbol_name="bench_target", pre_handler=lambda p, r: 0)]
        yield "k (stepped)", lambda: [Kprobe(symbol_name="bench_target",
                                             pre_handler=lambda p, r: 0,
                                             post_handler=lambda p, r, f: None)]
        yield "j", lambda: [Jprobe(j_entry, symbol_name="bench_target")]
        yield "r", lambda: [Kretprobe(handler=lambda ri, r: 0, symbol_name="bench_target")]
        yield "kr", lambda: [Kprobe(symbol_name="bench_target", pre_handler=lambda p, r: 0),
                             Kretprobe(handler=lambda ri, r: 0, symbol_name="bench_target")]
        yield "jr", lambda: [Jprobe(j_entry, symbol_name="bench_target"),
                             Kretprobe(handler=lambda ri, r: 0, symbol_name="bench_target")]

    async def register(m, probes):
        for p in probes:
            kind = {Kprobe: "kprobe", Jprobe: "jprobe", Kretprobe: "kretprobe"}[type(p)]
            await getattr(m.kprobes, f"register_{kind}")(p)

    async def unregister(m, probes):
        for p in probes:
            kind = {Kprobe: "kprobe", Jprobe: "jprobe", Kretprobe: "kretprobe"}[type(p)]
            await getattr(m.kprobes, f"unregister_{kind}")(p)

    async def run():
        out = {}
        async with Machine(arch=arch, cpus=1, seed=1, trap_delay=0) as m:
            async def timed():
                best = float("inf")
                for _ in range(3):
                    t0 = _cpu_time()
                    await m.call("bench_loop", n, cpu=0)
                    best = min(best, _cpu_time() - t0)
                return best
            base = await timed()
            # The document's columns are trap-based; o and ro are jump-optimized.
            await m.sysctl.write("debug/kprobes-optimization", "0")
            for name, make in configs():
                probes = make()
                await register(m, probes)
                out[name] = (await timed() - base) / n * 1e6
                await unregister(m, probes)
            await m.sysctl.write("debug/kprobes-optimization", "1")
            for name, make in (("o", lambda: [Kprobe(symbol_name="bench_target",
                                                      pre_handler=lambda p, r: 0)]),
                               ("ro", lambda: [Kretprobe(handler=lambda ri, r: 0,
                                                         symbol_name="bench_target")])):
                probes = make()
                await register(m, probes)
                await m.kprobes.optimizer.wait_for_kprobe_optimizer()
                out[name] = (await timed() - base) / n * 1e6
                await unregister(m, probes)
        return out
    return trio.run(run)


def print_overhead(rows: dict[str, dict[str, float]], hook_us: float) -> None:
    print("bench overhead: us per hit on bench_target (1 CPU), as the kprobes document's table")
    print("  k = unboosted kprobe (trap + single-step, as in 2.6.25); kb = boosted kprobe (later "
          "kernels)")
    print("  o = jump-optimized kprobe, ro = kretprobe whose entry is jump-optimized "
          "(arm64, sparc64: trap-based, as kb and r)")
    cols = ["k", "j", "r", "kr", "jr", "kb", "o", "ro"]
    print(f"  {'arch':<9}" + "".join(f"{c:>8}" for c in cols) +
          f"{'j/k':>7}{'r/k':>7}{'kr/r':>7}{'r/kb':>7}{'o/kb':>7}{'ro/r':>7}")
    print(f"  {'document':<9}" + "".join(f"{v:>8}" for v in
                                         ("0.49", "0.76", "0.80", "0.82", "1.07", "-", "-",
                                          "-")) +
          f"{'1.55':>7}{'1.63':>7}{'1.03':>7}{'-':>7}{'-':>7}{'-':>7}   (x86_64, Opteron 246)")
    for arch, r in rows.items():
        k = r["k (stepped)"]
        vals = [k, r["j"], r["r"], r["kr"], r["jr"], r["k"], r["o"], r["ro"]]
        print(f"  {arch:<9}" + "".join(f"{v:>8.2f}" for v in vals) +
              f"{r['j'] / k:>7.2f}{r['r'] / k:>7.2f}{r['kr'] / r['r']:>7.2f}"
              f"{r['r'] / r['k']:>7.2f}{r['o'] / r['k']:>7.2f}{r['ro'] / r['r']:>7.2f}")
    print(f"  baseline: a bare Unicorn UC_HOOK_CODE Python callback costs {hook_us:.2f} us")
    for arch, r in rows.items():
        k = r["k (stepped)"]
        target(f"{arch}: j <= 1.75 x k", r["j"] / k, r["j"] / k <= 1.75, "x k")
        target(f"{arch}: r <= 1.75 x k", r["r"] / k, r["r"] / k <= 1.75, "x k")
        target(f"{arch}: kr <= 1.1 x r", r["kr"] / r["r"], r["kr"] / r["r"] <= 1.1, "x r")
        if not _has_optprobes(arch):
            print(f"  target {arch}: o and ro: not applicable (no optprobes on {arch}, as in "
                  f"Linux: o and ro are the trap-based kb and r)")
            continue
        target(f"{arch}: o <= kb / 3", r["o"] / r["k"], r["o"] / r["k"] <= 1 / 3, "x kb")
        target(f"{arch}: ro <= 0.5 x r", r["ro"] / r["r"], r["ro"] / r["r"] <= 0.5, "x r")


def _has_optprobes(arch: str) -> bool:
    from smpkprobes.cpus import get_backend
    from smpkprobes.cpus._optprobe import opt_facts
    return opt_facts(get_backend(arch)) is not None


def target(what: str, value: float, met: bool, unit: str = "") -> bool:
    """One target line: what is asked, what was measured, and whether it was met."""
    print(f"  target {what}: measured {value:.2f}{' ' + unit if unit else ''}: "
          f"{'met' if met else 'NOT met'}")
    return met


def _rss_mb() -> float:
    """This process's resident set size now, in MB (VmRSS; peak RSS where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_memory(hits=(1_000_000, 2_000_000, 3_000_000), arch: str = "x86_64",
                 optimization: bool = True) -> list[dict]:
    """RSS as probe hits accumulate: one kprobe on bench_target, bench_loop on one CPU, the
    default configuration (trap_delay, invariants, trace_limit), the probe jump-optimized
    or, with `optimization` False, trapping (every trap then draws the deferral's recorded
    coin).  Memory per hit must be O(1) amortised: the event trace is a ring, the digest a
    rolling hash."""
    from ..kprobes._core import Kprobe

    async def run() -> list[dict]:
        rows = []
        async with Machine(arch=arch, cpus=1, seed=1, call_budget=10**12) as m:
            await m.sysctl.write("debug/kprobes-optimization", "1" if optimization else "0")
            kp = Kprobe(symbol_name="bench_target", pre_handler=lambda p, regs: 0)
            await m.kprobes.register_kprobe(kp)
            await m.kprobes.optimizer.wait_for_kprobe_optimizer()
            done = 0
            for target in hits:
                await m.call("bench_loop", target - done)
                done = target
                gc.collect()
                rows.append({"hits": m.kprobes.hits, "rss": _rss_mb(),
                             "trace": len(m.trace)})
            await m.kprobes.unregister_kprobe(kp)
        return rows
    return trio.run(run)


def main(what: str = "all", quick: bool = False, arches=None) -> int:
    if what == "memory":
        hits = (100_000, 200_000, 300_000) if quick else (1_000_000, 2_000_000, 3_000_000)
        print("bench memory: RSS as kprobe hits accumulate (bench_loop, 1 CPU, defaults)")
        for optimization, how in ((True, "jump-optimized"), (False, "trapping (sysctl 0)")):
            rows = bench_memory(hits, optimization=optimization)
            print(f"  the probe {how}:")
            print(f"  {'hits':>10} {'RSS MB':>8} {'trace events kept':>18}")
            for r in rows:
                print(f"  {r['hits']:>10,} {r['rss']:>8.1f} {r['trace']:>18,}")
            growth = rows[-1]["rss"] - rows[0]["rss"]
            target(f"{how}: growth from {rows[0]['hits']:,} to {rows[-1]['hits']:,} hits "
                   f"under 150 MB", growth, growth < 150, "MB")
        return 0
    if what in ("all", "machine"):
        rows = bench_machine(n=50_000 if quick else 200_000)
        print("bench machine: guest instructions per second, probe-free bench_loop on every CPU")
        print(f"  {'configuration':<32} {'Minsn/s':>9} {'vs bare':>8}")
        for r in rows:
            print(f"  {r['config']:<32} {r['ips'] / 1e6:>9.1f} {r['ratio']:>7.1%}")
        last = rows[-1]
        target(f"{last['config'].removeprefix('machine, ')} keep >= 50% of the bare instance",
               last["ratio"] * 100, last["ratio"] >= 0.5, "%")
    if what in ("all", "overhead"):
        from smpkprobes.cpus import available
        rows = {arch: bench_overhead(arch, n=3_000 if quick else 10_000)
                for arch in (arches or available())}
        print_overhead(rows, bare_hook_cost(n=5_000 if quick else 20_000))
    if what in ("all", "kprobe"):
        rows = bench_kprobe(n=5_000 if quick else 20_000, others=2_000 if quick else 10_000)
        print("bench kprobe: cost per hit on bench_target (1 CPU)")
        print(f"  {'what':<62} {'us/hit':>8} {'ratio':>7}")
        for r in rows:
            us = "" if r["us"] != r["us"] else f"{r['us']:.2f}"
            print(f"  {r['what']:<62} {us:>8} {r['ratio']:>7.2f}")
        by = {r["what"].split(" (")[0] if "jump" not in r["what"] else "optimized": r
              for r in rows}
        boosted = rows[2]["ratio"]
        crowded = next(r["ratio"] for r in rows if "other probes" in r["what"])
        free = next(r["ratio"] for r in rows if "probe-free" in r["what"])
        target("boosted hit <= 8 x the bare hook", boosted, boosted <= 8, "x")
        target("boosted hit with other probes <= 1.1 x alone", crowded, crowded <= 1.1, "x")
        target("probe-free loop with probes elsewhere at full speed (0.9..1.1)", free,
               0.9 <= free <= 1.1, "x")
        opt = by["optimized"]["ratio"]
        target("jump-optimized hit <= 2 x the bare hook", opt, opt <= 2, "x")
        target("jump-optimized hit <= 1/3 of the boosted hit", opt / boosted,
               opt / boosted <= 1 / 3, "x boosted")
    if what in ("all", "watchpoint"):
        from ._bench_hwbp import bench_watchpoint, print_watchpoint
        print_watchpoint(bench_watchpoint(n=5_000 if quick else 20_000))
    if what in ("all", "campaign"):
        from . import _bench_campaign
        _bench_campaign.main(quick=quick)
    return 0

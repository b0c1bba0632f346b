"""concurrent_hits: N CPUs on one probe, with per-CPU hit counts and overlapping handlers.

One kprobe on do_fork, with a pre_handler and a post_handler, while every CPU runs
fork_loop at once (each CPU ran it before the probe went in, so its translation cache
holds the unprobed code: arming has to reach every CPU).  Each handler notes its CPU and
virtual time.  The report shows how many hits each CPU took, how often consecutive hits
came from different CPUs, and the largest number of CPUs that were between their pre and
post handler at the same moment: the handlers really run concurrently, each CPU with its
own control block and single-step.

Expectations: every call is a hit (hits + nmissed == entries, with entries counted by the
guest itself: do_fork hands out pids from one atomic counter), each CPU hits exactly as
often as it called, each pre is followed by a post on the same CPU for the same call, and
the handlers see the probe address and flags 0.

    python scenarios/concurrent_hits.py [--arch A] [--cpus N] [--seed S] [--preempt]
        [--size CALLS_PER_CPU]
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

try:
    import smpkprobes
except ImportError:      # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smpkprobes import Kprobe
from smpkprobes.scenario import scenario_main


def last_pid(m) -> int:
    addr = m.kallsyms_lookup_name("last_pid")
    return int.from_bytes(m.read_memory(addr, m.backend.word_bytes), m.backend.endian,
                          signed=True)


async def scenario(m, report, args) -> None:
    n = args.size or 300
    events: list[tuple[int, int, str]] = []      # (virtual ns, cpu, "pre"/"post")
    bad: list[str] = []
    open_on: dict[int, int] = {}                  # cpu -> pre's time, until its post

    def pre(p, regs):
        cpu = regs.cpu.id
        if regs.ip != p.addr:
            bad.append(f"pre on cpu{cpu} saw ip {regs.ip:#x}")
        if cpu in open_on:
            bad.append(f"cpu{cpu}: a second pre before the post")
        open_on[cpu] = regs.cpu.now_ns()
        events.append((regs.cpu.now_ns(), cpu, "pre"))
        return 0

    def post(p, regs, flags):
        cpu = regs.cpu.id
        if flags != 0:
            bad.append(f"post on cpu{cpu} got flags {flags}")
        if open_on.pop(cpu, None) is None:
            bad.append(f"cpu{cpu}: a post without its pre")
        events.append((regs.cpu.now_ns(), cpu, "post"))

    async def loop(cpu, out):
        out[cpu] = await m.call("fork_loop", n, cpu=cpu)

    warm: dict[int, int] = {}
    async with trio.open_nursery() as nursery:
        for c in range(m.ncpus):
            nursery.start_soon(loop, c, warm)

    kp = Kprobe(symbol_name="do_fork", pre_handler=pre, post_handler=post)
    await m.kprobes.register_kprobe(kp)
    pid0 = last_pid(m)
    results: dict[int, int] = {}
    async with trio.open_nursery() as nursery:
        for c in range(m.ncpus):
            nursery.start_soon(loop, c, results)
    entries = last_pid(m) - pid0
    await m.kprobes.unregister_kprobe(kp)

    pres = [e for e in events if e[2] == "pre"]
    per_cpu = [sum(1 for e in pres if e[1] == c) for c in range(m.ncpus)]
    order = [e[1] for e in pres]                  # the order in which the hits happened
    switches = sum(a != b for a, b in zip(order, order[1:]))
    # Overlap, in the order the handlers ran: how many CPUs sat between pre and post.
    inside, most, overlapped = set(), 0, 0
    for _, cpu, kind in events:
        if kind == "pre":
            if inside:
                overlapped += 1
            inside.add(cpu)
            most = max(most, len(inside))
        else:
            inside.discard(cpu)

    report.print(f"concurrent_hits: do_fork probed, {m.ncpus} CPUs x fork_loop({n})")
    report.print(f"  {'cpu':>4} {'hits':>6} {'first hit at':>13} {'last hit at':>12}")
    for c in range(m.ncpus):
        times = [t for t, cpu, _ in pres if cpu == c]
        report.print(f"  {c:>4} {per_cpu[c]:>6} {min(times, default=0):>10} ns "
                     f"{max(times, default=0):>9} ns")
    report.print(f"  total {len(pres)} hits, nmissed {kp.nmissed}, {entries} entries "
                 f"(do_fork calls, by the guest's pid counter)")
    report.print(f"  hits in the order they happened: {switches} switches between CPUs in "
                 f"{len(pres)} hits; first 40 by CPU: {''.join(str(c) for c in order[:40])}")
    report.print(f"  handlers concurrently in flight: up to {most} CPUs between pre and post "
                 f"at once; {overlapped} pres ran while another CPU was mid-probe")

    report.expect(warm == results == {c: n for c in range(m.ncpus)},
                  f"fork_loop returned {n} on every CPU, probed or not")
    report.expect(len(pres) + kp.nmissed == entries == n * m.ncpus,
                  f"hits {len(pres)} + nmissed {kp.nmissed} == entries {entries} == "
                  f"{n * m.ncpus}")
    report.expect(per_cpu == [n] * m.ncpus, f"each CPU hit once per call: {per_cpu}")
    report.expect(len(events) == 2 * len(pres) and not open_on,
                  f"every pre has its post ({len(events) - len(pres)} posts)")
    report.expect(not bad, f"handlers saw p->addr, flags 0, pre/post paired: {bad[:3]}")
    report.expect(kp.nmissed == 0, f"nmissed {kp.nmissed} (no reentry here)")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__))

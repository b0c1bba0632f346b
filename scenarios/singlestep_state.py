"""singlestep_state: probes on every kind of instruction, stepped on all CPUs at once.

A kprobe on every instruction boundary of do_fork, fork_loop, sys_open, do_sys_open and
open_loop (every other one with a post_handler, so that copies are both boosted and
single-stepped to a trap), one more on do_sys_open's entry whose pre_handler calls the
probed kprobe_target (a reentry), while every CPU runs fork_loop and open_loop at once.
Every CPU records its control block's transitions (`m.kprobes.kprobe_ctlblk[cpu].transitions`).

The report lists the instruction kinds (copied out of line with or without a RIP-relative
fixup, boosted or stepped, simulated control flow) with their hits, and each CPU's
transition counts.  Each CPU's sequence must follow KPROBES.md section 3:

  NONE -> HIT_ACTIVE -> HIT_SS -> HIT_SSDONE -> NONE     stepped, or simulated
  NONE -> HIT_ACTIVE -> NONE                             boosted (the slot jumps back)
  any active state -> REENTER -> (the saved state)       a probe hit inside a handler

and the functions must return what they return unprobed.

    python scenarios/singlestep_state.py [--arch A] [--cpus N] [--seed S] [--preempt]
        [--size LOOPS]
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import trio

try:
    import smpkprobes
except ImportError:      # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smpkprobes.cpus import StepKind, UnsteppableError
from smpkprobes import Kprobe, KprobeError
from smpkprobes.scenario import scenario_main

FUNCS = ("do_fork", "fork_loop", "sys_open", "do_sys_open", "open_loop")
ACTIVE = ("HIT_ACTIVE", "HIT_SS", "HIT_SSDONE")


def kind_of(m, addr: int, post: bool) -> str:
    plan = m.backend.plan_insn(m.kprobes.original_text(addr, m.backend.max_insn_len), addr)
    if plan.kind is StepKind.SIMULATE:
        return f"simulated {plan.mnemonic.split()[0]}"
    how = "stepped" if post or not plan.boostable else "boosted"
    fix = ", pc-relative fixup" if plan.fixup is not None else ""
    return f"copied, {how}{fix}"


def check_transitions(seq: list[tuple[int, str]]) -> str | None:
    """None if `seq` (one CPU's (addr, status) log) follows the state machine."""
    state, saved = "NONE", []
    for i, (addr, status) in enumerate(seq):
        if status == "REENTER":
            if state not in ACTIVE:
                return f"#{i}: REENTER from {state}"
            saved.append((addr, state))
            state = "REENTER"
            continue
        if state == "REENTER":
            if not saved or status != saved[-1][1]:
                return f"#{i}: REENTER restored {status}, not {saved[-1][1] if saved else '-'}"
            saved.pop()
            state = status
            continue
        allowed = {"NONE": ("HIT_ACTIVE",), "HIT_ACTIVE": ("HIT_SS", "NONE"),
                   "HIT_SS": ("HIT_SSDONE",), "HIT_SSDONE": ("NONE",)}[state]
        if status not in allowed:
            return f"#{i}: {state} -> {status}"
        state = status
    return None if state == "NONE" and not saved else f"ends in {state}"


async def scenario(m, report, args) -> None:
    n = args.size or 6
    # The single-step state machine is what this watches: with jump optimization the
    # probes that pass its checks would leave the trap path (sysctl -w
    # debug.kprobes-optimization=0, as a kernel tester would).
    await m.sysctl.write("debug/kprobes-optimization", "0")
    work = [("fork_loop", (n,)), ("open_loop", (n, 3))]
    expected = {f: await m.call(f, *a) for f, a in work}
    hits: Counter = Counter()
    kinds: dict[int, str] = {}
    probes, refused = [], []
    for func in FUNCS:
        sym = m.kallsyms.lookup(func)
        for i, addr in enumerate(sorted(m.kprobes._insn_boundaries(sym))):
            post = (lambda p, r, f: None) if i % 2 else None
            try:
                kinds[addr] = kind_of(m, addr, post is not None)
            except UnsteppableError as err:
                refused.append(f"{m.format_addr(addr)}: {err.reason}")
                continue
            kp = Kprobe(addr=addr, pre_handler=lambda p, r: hits.update([p.addr]) and 0,
                        post_handler=post)
            try:
                await m.kprobes.register_kprobe(kp)
            except KprobeError as err:
                refused.append(f"{m.format_addr(addr)}: {err}")
                continue
            probes.append(kp)
    nested = Kprobe(symbol_name="kprobe_target", pre_handler=lambda p, r: hits.update(["nested"]))
    caller = Kprobe(symbol_name="do_sys_open",
                    pre_handler=lambda p, r: r.cpu.call("kprobe_target", 9) and 0)
    await m.kprobes.register_kprobes([nested, caller])
    kcbs = m.kprobes.kprobe_ctlblk
    for kcb in kcbs:
        kcb.transitions = []

    results: dict[tuple[str, int], int] = {}

    async def run(cpu):
        for f, a in work:
            results[(f, cpu)] = await m.call(f, *a, cpu=cpu)

    async with trio.open_nursery() as nursery:
        for c in range(m.ncpus):
            nursery.start_soon(run, c)
    logs = [kcb.transitions for kcb in kcbs]
    for kcb in kcbs:
        kcb.transitions = None
    await m.kprobes.unregister_kprobes([*probes, nested, caller])

    by_kind: dict[str, list[int]] = {}
    for addr, k in kinds.items():
        by_kind.setdefault(k, []).append(addr)
    report.print(f"singlestep_state: {len(probes)} probes on {', '.join(FUNCS)}; "
                 f"{m.ncpus} CPUs x {', '.join(f'{f}{a}' for f, a in work)}")
    report.print(f"  {'instruction kind':<38} {'probes':>6} {'hits':>7}")
    for k in sorted(by_kind):
        report.print(f"  {k:<38} {len(by_kind[k]):>6} {sum(hits[a] for a in by_kind[k]):>7}")
    for line in refused:
        report.print(f"  refused {line}")
    report.print(f"  reentry: kprobe_target hit {hits['nested']} times inside a handler, "
                 f"nmissed {nested.nmissed}")
    report.print(f"  {'cpu':>4} {'transitions':>11}  " + " ".join(
        f"{s:>10}" for s in ("HIT_ACTIVE", "HIT_SS", "HIT_SSDONE", "REENTER", "NONE")))
    for c, log in enumerate(logs):
        cnt = Counter(s for _, s in log)
        report.print(f"  {c:>4} {len(log):>11}  " + " ".join(
            f"{cnt[s]:>10}" for s in ("HIT_ACTIVE", "HIT_SS", "HIT_SSDONE", "REENTER", "NONE")))
    if logs and logs[0]:
        sample = " ".join(s.replace("HIT_", "") for _, s in logs[0][:14])
        report.print(f"  cpu0 begins: {sample} ...")

    report.expect(all(results[(f, c)] == expected[f] for f, _ in work for c in range(m.ncpus)),
                  f"every function returned what it returns unprobed ({expected})")
    for c, log in enumerate(logs):
        why = check_transitions(log)
        report.expect(why is None, f"cpu{c}'s control block followed KPROBES.md section 3 "
                                   f"({why})")
        statuses = {s for _, s in log}
        report.expect({"HIT_ACTIVE", "HIT_SS", "HIT_SSDONE", "REENTER"} <= statuses,
                      f"cpu{c} went through every state ({sorted(statuses)})")
    report.expect(hits["nested"] == 0 and nested.nmissed == m.ncpus * n,
                  f"the probe hit inside a handler never ran its own and was missed once "
                  f"per do_sys_open call ({nested.nmissed} vs {m.ncpus * n})")
    report.expect(all(kcbs[cpu.id].current_kprobe is None and cpu.preempt_count == 0
                      for cpu in m.cpus), "every control block is idle afterwards")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__))

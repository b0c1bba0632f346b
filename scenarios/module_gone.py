"""module_gone: load a module, probe it, unload it; the probe shows [GONE] in the list.

example_mod is loaded (its init function runs, then its init text is freed), a kprobe and
a kretprobe go on example_mod_func, and every CPU calls it.  Then the module is unloaded
under the probes.  KPROBES.md section 6:

  * a probe on freed init text is refused with ENOENT;
  * kprobes/list names the module for probes in module text: "[example_mod]";
  * when the module unloads, its probes are marked GONE: listed with [GONE] until they are
    unregistered, their slots freed, the (gone) text not restored; enabling one is EINVAL;
    unregistering one is legal and empties the list;
  * loaded again, the module can be probed again.

    python scenarios/module_gone.py [--arch A] [--cpus N] [--seed S] [--preempt]
        [--size CALLS_PER_CPU]
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import trio

try:
    import smpkprobes
except ImportError:      # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smpkprobes import Kprobe, KprobeError, Kretprobe
from smpkprobes.scenario import scenario_main


async def call_everywhere(m, func, arg, n):
    results = []

    async def run(cpu):
        for i in range(n):
            results.append((arg + i, await m.call(func, arg + i, cpu=cpu)))
    async with trio.open_nursery() as nursery:
        for c in range(m.ncpus):
            nursery.start_soon(run, c)
    return results


async def scenario(m, report, args) -> None:
    n = args.size or 10
    mod = await m.load_module("example_mod")
    report.print(f"module_gone: loaded example_mod: text {mod.text[0]:#x}-{mod.text[1]:#x}, "
                 f"init text {mod.init_text[0]:#x}-{mod.init_text[1]:#x} (freed after init)")
    try:
        await m.kprobes.register_kprobe(Kprobe(symbol_name="example_mod_init"))
        err = None
    except KprobeError as e:
        err = e
    report.print(f"  probe on example_mod_init: {err}")
    report.expect(err is not None and err.errno == errno.ENOENT,
                  f"a probe on freed init text is refused with ENOENT ({err})")

    hits, rets = [0] * m.ncpus, [0]
    kp = Kprobe(symbol_name="example_mod_func",
                pre_handler=lambda p, r: hits.__setitem__(r.cpu.id, hits[r.cpu.id] + 1))
    rp = Kretprobe(symbol_name="example_mod_func", maxactive=m.ncpus,
                   handler=lambda ri, r: rets.__setitem__(0, rets[0] + 1))
    await m.kprobes.register_kprobe(kp)
    await m.kprobes.register_kretprobe(rp)
    listed = m.debugfs.read("kprobes/list")
    results = await call_everywhere(m, "example_mod_func", 100, n)
    report.print("  kprobes/list while loaded:")
    for line in listed.splitlines():
        report.print(f"    {line}")
    report.print(f"  {m.ncpus} CPUs x {n} calls: hits per CPU {hits}, return handlers {rets[0]}")
    report.expect(all(r == a + 1 for a, r in results) and len(results) == n * m.ncpus,
                  "example_mod_func(x) returned x + 1 under the probes")
    report.expect(hits == [n] * m.ncpus and rets[0] == n * m.ncpus and rp.nmissed == 0,
                  f"every call hit both probes ({hits}, {rets[0]} returns)")
    report.expect(len(listed.splitlines()) == 2 and
                  all("example_mod_func+0x0  [example_mod]" in line
                      for line in listed.splitlines()),
                  "kprobes/list names the module for both probes")

    slots_before = m.kprobes.slots.statistics()["used"]
    await m.unload_module(mod)
    gone = m.debugfs.read("kprobes/list")
    report.print("  kprobes/list after unloading example_mod:")
    for line in gone.splitlines():
        report.print(f"    {line}")
    report.expect(kp.gone and rp.kp.gone and len(gone.splitlines()) == 2 and
                  all(line.endswith("[GONE]") for line in gone.splitlines()),
                  "both probes are marked GONE and still listed")
    report.expect(m.kprobes.slots.statistics()["used"] == slots_before - 1,
                  "the gone probe's slot was freed")
    try:
        await m.kprobes.enable_kprobe(kp)
        err = None
    except KprobeError as e:
        err = e
    report.print(f"  enable_kprobe on the gone probe: {err}")
    report.expect(err is not None and err.errno == errno.EINVAL, "enabling a GONE probe is EINVAL")
    await m.kprobes.unregister_kprobe(kp)
    await m.kprobes.unregister_kretprobe(rp)
    report.expect(m.debugfs.read("kprobes/list") == "" and not kp.registered,
                  "unregistering GONE probes is legal and empties the list")

    mod = await m.load_module("example_mod")
    again = Kprobe(symbol_name="example_mod_func",
                   pre_handler=lambda p, r: hits.__setitem__(0, hits[0] + 1))
    await m.kprobes.register_kprobe(again)
    before = hits[0]
    r = await m.call("example_mod_func", 41)
    await m.kprobes.unregister_kprobe(again)
    await m.unload_module(mod)
    report.print(f"  reloaded, probed again: example_mod_func(41) = {r}, "
                 f"{hits[0] - before} hit")
    report.expect(r == 42 and hits[0] == before + 1, "the reloaded module can be probed again")


if __name__ == "__main__":
    sys.exit(scenario_main(scenario, __doc__))

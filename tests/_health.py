"""The reliability suite's health check: after an attack, the machine still works.

`await healthy(m)` registers a probe on `kprobe_target`, calls it on every CPU at once,
unregisters it, and checks that every call hit, that no task oopsed meanwhile, that the
whole kernel text is byte for byte the image's (no breakpoint left behind anywhere) and,
when no probe is left registered, that no instruction slot is still in use.
"""

from __future__ import annotations

import functools

import trio

from smpkprobes import Kprobe, Machine

_PRISTINE: dict[str, tuple[int, bytes]] = {}


def kernel_text(m) -> tuple[int, bytes]:
    """(start, bytes) of the kernel's .text as the image has it."""
    if m.arch not in _PRISTINE:
        fresh = Machine(arch=m.arch, cpus=1, invariants=False)
        start, size = fresh.kernel.sections[".text"]
        _PRISTINE[m.arch] = (start, fresh.read_memory(start, size))
    return _PRISTINE[m.arch]


def text_is_pristine(m) -> bool:
    start, text = kernel_text(m)
    return m.read_memory(start, len(text)) == text


async def healthy(m, symbol: str = "kprobe_target") -> None:
    oopses = len(m.oopses)
    hits = []
    kp = Kprobe(symbol_name=symbol, pre_handler=lambda p, regs: hits.append(regs.cpu.id))
    await m.kprobes.register_kprobe(kp)
    results = {}

    async def one(cpu):
        results[cpu] = await m.call(symbol, 30, cpu=cpu)
    async with trio.open_nursery() as n:
        for cpu in range(m.ncpus):
            n.start_soon(functools.partial(one, cpu))
    await m.kprobes.unregister_kprobe(kp)
    assert sorted(hits) == list(range(m.ncpus)), hits
    assert set(results.values()) == {10}, results
    assert len(m.oopses) == oopses, m.oopses[oopses:]
    assert kp.nmissed == 0
    if not m.kprobes.probes():
        assert text_is_pristine(m), "a breakpoint or stale byte is left in the kernel text"
        assert m.kprobes.statistics().slots_used == 0, "an instruction slot leaked"

"""Test helpers shared by several test modules."""

from smpkprobes import Kprobe, KprobeError


async def register_where_possible(m, addrs, **handlers) -> list[Kprobe]:
    """A kprobe with `handlers` on each address the arch can probe (refused ones skipped)."""
    probes = []
    for a in addrs:
        kp = Kprobe(addr=a, **handlers)
        try:
            await m.kprobes.register_kprobe(kp)
        except KprobeError:
            continue
        probes.append(kp)
    return probes

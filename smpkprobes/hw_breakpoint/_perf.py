"""`smpkprobes trace 'mem:SYMBOL[/LEN][:ACCESS]'`: perf's breakpoint events on the machine.

perf's syntax (tools/perf/util/parse-events): `mem:ADDR[/LEN][:ACCESS]`, ADDR a number or
here a guest symbol, ACCESS some of r, w, x (default rw), LEN a byte count (default 4 for
data, sizeof(long) for x).  Each event is a wide hardware breakpoint; every trigger prints one
ftrace-style line.
"""

from __future__ import annotations

import functools
import re
from typing import Callable

import trio

from .._errors import KprobeError
from .._ftrace import ftrace_line
from ._core import HwBreakpointAttr

_MEM = re.compile(r"mem:(?P<where>[^/:]+)(?:/(?P<len>[0-9]+))?(?::(?P<access>[rwx]+))?$")


def parse_mem_event(spec: str, word_bytes: int) -> HwBreakpointAttr:
    """The attr of one `mem:` event; ValueError for what does not parse."""
    m = _MEM.match(spec.strip())
    if m is None:
        raise ValueError(f"bad breakpoint event {spec!r}: expected mem:SYMBOL|ADDR[/LEN][:rwx]")
    access = "".join(c for c in "rwx" if c in (m["access"] or "rw"))
    if "x" in access and access != "x":
        raise ValueError(f"bad breakpoint event {spec!r}: x cannot be combined with r or w")
    where = m["where"]
    try:
        addr, symbol = int(where, 0), None
    except ValueError:
        addr, symbol = None, where
    length = int(m["len"]) if m["len"] else (word_bytes if access == "x" else 4)
    return HwBreakpointAttr(bp_addr=addr, symbol_name=symbol, bp_len=length, bp_type=access)


async def trace_session(definitions: list[str], workloads: list[tuple[str, tuple[int, ...]]], *,
                        boot: Callable, arch: str = "x86_64", cpus: int = 4, seed: int = 1,
                        preempt: bool = False, out: Callable[[str], None] = print,
                        err: Callable[[str], None] = print, after=None) -> int:
    """Register each `mem:` event as a wide breakpoint, run every workload once on every CPU,
    print a line per trigger.  Returns a process exit status.  `boot(arch=, cpus=, seed=,
    preempt=)` makes the machine (the composed system is the caller's: this layer does not
    import it)."""
    async with boot(arch=arch, cpus=cpus, seed=seed, preempt=preempt) as m:
        others = [d for d in definitions if not d.startswith("mem:")]
        if others:
            err(f"mem: events cannot be mixed with kprobe events here: {others[0]!r}")
            return 2
        missing = [name for name, _ in workloads if not m.kallsyms_lookup_name(name)]
        if missing:
            err(f"no such guest function: {', '.join(missing)}")
            return 2
        hw = m.hw_breakpoints
        handles = []
        lines = 0
        try:
            for d in definitions:
                attr = parse_mem_event(d, m.backend.word_bytes)
                event = f"mem:{attr.symbol_name or format(attr.bp_addr, '#x')}"

                def triggered(bp, data, regs, event=event):
                    nonlocal lines
                    lines += 1
                    task = regs.cpu.current
                    body = (f"({m.format_addr(data.insn)}) addr={data.addr:#x} "
                            f"access={data.access}")
                    out(ftrace_line(task.comm, task.pid, data.cpu, regs.cpu.now_ns(), event,
                                    body))
                handles.append((event, await hw.register_wide_hw_breakpoint(attr, triggered)))
        except (KprobeError, ValueError) as e:
            err(str(e))
            return 1
        async with trio.open_nursery() as n:
            for name, args in workloads:
                for cpu in range(cpus):
                    n.start_soon(functools.partial(m.call, name, *args, cpu=cpu))
        for _, h in handles:
            await hw.unregister_wide_hw_breakpoint(h)
        err(f"# {lines} lines; " + ", ".join(f"{ev} {h.hits} hits" for ev, h in handles))
    if after is not None:
        after(m)
    return 0

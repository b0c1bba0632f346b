"""`smpkprobes trace`: a one-liner tracer over `m.tracefs` (kprobe_events, enable, trace_pipe).

Every definition tracefs accepts is accepted here: it is written to kprobe_events as is.  A
`MOD:SYM` definition loads MOD first (from the arch's kernel images), so that the workloads
may call into it.
"""

from __future__ import annotations

import functools
from typing import Callable

import trio


# Default arguments of the workloads `--workload` knows by name; `n` is --loops.
WORKLOADS: dict[str, Callable[[int], tuple[int, ...]]] = {
    "fork_loop": lambda n: (n,),
    "open_loop": lambda n: (n, 3),
    "fib": lambda n: (10,),
    "sleepy": lambda n: (1,),
    "bench_loop": lambda n: (n,),
    "stacktrace_driver": lambda n: (),
    "kprobe_target": lambda n: (n,),
    "vfs_read": lambda n: (0, 0, n, 0),
    "tcp_v4_rcv": lambda n: (0,),
    "example_mod_func": lambda n: (n,),
}


def parse_workloads(spec: str, loops: int) -> list[tuple[str, tuple[int, ...]]]:
    """`fork_loop,open_loop:10:2,fib:12`: guest functions, each with optional `:ARG`s;
    known workloads default their arguments from `loops`."""
    out = []
    for item in filter(None, (w.strip() for w in spec.split(","))):
        name, *args = item.split(":")
        try:
            values = tuple(int(a, 0) for a in args)
        except ValueError:
            raise ValueError(f"workload {item!r}: arguments must be integers") from None
        if not values and name in WORKLOADS:
            values = WORKLOADS[name](loops)
        out.append((name, values))
    return out


def modules_named(definitions: list[str]) -> list[str]:
    """The MOD of every `MOD:SYM` probe point, in order, once each."""
    out = []
    for d in definitions:
        words = d.split()
        if len(words) > 1 and words[0][:1] in "pr" and ":" in words[1] \
                and "/" not in words[1]:
            mod = words[1].split(":", 1)[0]
            if mod not in out:
                out.append(mod)
    return out


async def trace_session(definitions: list[str], workloads: list[tuple[str, tuple[int, ...]]], *,
                        boot: Callable, arch: str = "x86_64", cpus: int = 4, seed: int = 1,
                        preempt: bool = False, out: Callable[[str], None] = print,
                        err: Callable[[str], None] = print, after=None) -> int:
    """Define the events, enable them, run every workload once on every CPU, and hand each
    trace line to `out` as it is recorded.  Returns a process exit status.

    `boot(arch=, cpus=, seed=, preempt=)` makes the machine (an async context manager): the
    composed `Machine`, which its caller passes in (the probe core does not import it)."""
    async with boot(arch=arch, cpus=cpus, seed=seed, preempt=preempt) as m:
        fs = m.tracefs
        for mod in modules_named(definitions):
            try:
                await m.load_module(mod)
            except (OSError, ValueError):
                err(f"no such module: {mod}")
                return 2
        missing = [name for name, _ in workloads if not m.kallsyms_lookup_name(name)]
        if missing:
            err(f"no such guest function: {', '.join(missing)}")
            return 2
        for d in definitions:       # a bad one raises KprobeError: the caller reports it
            await fs.write("kprobe_events", d, append=True)
        if not fs.events():
            err("no kprobe events defined")
            return 2
        fs.follow(out)
        await fs.write("events/enable", "1")
        async with trio.open_nursery() as n:
            for name, args in workloads:
                for cpu in range(cpus):
                    n.start_soon(functools.partial(m.call, name, *args, cpu=cpu))
        await fs.write("events/enable", "0")
        fs.unfollow(out)
        summary = ", ".join(f"{tp.group}/{tp.name} {tp.nhit} hits, {tp.nmissed} missed"
                            for tp in fs.events())
        err(f"# {fs.entries_written()} lines; {summary}")
        await fs.write("kprobe_events", "")
    if after is not None:
        after(m)
    return 0

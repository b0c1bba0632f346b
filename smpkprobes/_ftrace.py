"""The kernel's trace-file text: one line per event and the header above them.

Shared by tracefs (the probe core's `trace` file) and the exporters (tools/_trace_export),
so that neither layer imports the other.
"""

from __future__ import annotations

from typing import Iterable


def format_ts(ns: int) -> str:
    """ftrace's `%5lu.%06lu`, but with ns: the virtual clock counts one ns per instruction."""
    return f"{ns // 1_000_000_000:5d}.{ns % 1_000_000_000:09d}"


def ftrace_line(comm: str, pid: int, cpu: int | None, ns: int, event: str, body: str) -> str:
    """`<comm>-<pid> [cpu] timestamp: event: body`, padded like the kernel's trace file."""
    where = "---" if cpu is None else f"{cpu:03d}"
    return f"{comm[:16]:>16}-{pid:<7} [{where}] {format_ts(ns)}: {event}: {body}".rstrip()


def ftrace_header(nentries: int, ncpus: int, tracer: str = "nop", extra: Iterable[str] = (),
                  written: int | None = None) -> str:
    """The trace file's header.  `entries-in-buffer/entries-written` is the lines below it
    against every line written (`written`, by default the same: nothing overwritten)."""
    total = nentries if written is None else written
    lines = [f"# tracer: {tracer}", "#", *(f"# {e}" for e in extra),
             f"# entries-in-buffer/entries-written: {nentries}/{total}   #P:{ncpus}", "#",
             "#           TASK-PID     CPU#     TIMESTAMP  FUNCTION",
             "#              | |         |         |         |"]
    return "\n".join(lines) + "\n"

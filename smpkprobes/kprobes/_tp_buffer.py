"""The trace ring buffer behind tracefs' `trace` and `trace_pipe`: one per CPU, bounded by
`buffer_size_kb`, overwriting its oldest lines when full.

The kernel's ring buffer (kernel/trace/ring_buffer.c) keeps binary events in pages, one
buffer per CPU, and in its default overwrite mode a writer that finds the buffer full
drops the oldest page (counted as overrun) rather than the new event.  Here the unit is the
formatted line: a CPU's buffer holds lines whose sizes (text plus newline) add up to at
most its `buffer_size_kb` * 1024 bytes, and a new line drops the oldest ones, one line at
a time, until it fits.  A line larger than the whole buffer is dropped.

The counts are the kernel's (get_total_entries): entries are the lines in the buffers,
entries written are those plus the lines overwritten since the buffer was last reset.
Lines keep the order they were written in (a sequence number); `trace_pipe` hands out each
line once.
"""

from __future__ import annotations

import heapq
from collections import deque
from itertools import takewhile

# TRACE_BUF_SIZE_DEFAULT: 1441792 bytes per CPU, which buffer_size_kb shows as 1408.
DEFAULT_SIZE_KB = 1408


class CpuBuffer:
    """ring_buffer_per_cpu: the lines of one CPU, oldest first, with its size and counts."""

    def __init__(self, size_kb: int):
        self.size_kb = size_kb
        self.lines: deque[tuple[int, str]] = deque()
        self.bytes = 0               # sum of len(line) + 1 over `lines`
        self.overrun = 0             # lines overwritten since the last reset

    @property
    def limit(self) -> int:
        return self.size_kb << 10

    def make_room(self, need: int) -> None:
        """Drop the oldest lines until `need` more bytes fit (rb_tail_page_update's overrun
        in overwrite mode; rb_remove_pages when the buffer shrinks)."""
        lines = self.lines
        while lines and self.bytes + need > self.limit:
            _, old = lines.popleft()
            self.bytes -= len(old) + 1
            self.overrun += 1

    def reset(self) -> None:
        self.lines.clear()
        self.bytes = 0
        self.overrun = 0


class TraceBuffer:
    """The per-CPU buffers of the top-level trace instance."""

    def __init__(self, ncpus: int, size_kb: int = DEFAULT_SIZE_KB):
        self.cpus = [CpuBuffer(size_kb) for _ in range(ncpus)]
        self._seq = 0                # lines written since boot: each line's order key
        self._read_seq = 0           # trace_pipe has handed out every line up to this one

    def write(self, cpu: int, line: str) -> None:
        buf = self.cpus[cpu]
        need = len(line) + 1
        if need > buf.limit:
            return
        buf.make_room(need)
        self._seq += 1
        buf.lines.append((self._seq, line))
        buf.bytes += need

    def lines(self) -> list[str]:
        """Every line in the buffers, in the order they were written."""
        return [line for _, line in heapq.merge(*(b.lines for b in self.cpus))]

    def consume(self) -> list[str]:
        """trace_pipe: the lines not handed out before, in order (the newest lines of each
        CPU, found from its end)."""
        read = self._read_seq
        fresh = [list(takewhile(lambda item: item[0] > read, reversed(b.lines)))[::-1]
                 for b in self.cpus]
        self._read_seq = self._seq
        return [line for _, line in heapq.merge(*fresh)]

    def reset(self) -> None:
        """tracing_reset_online_cpus: empty every CPU's buffer and zero its counts."""
        for b in self.cpus:
            b.reset()
        self._read_seq = self._seq

    def entries(self) -> int:
        return sum(len(b.lines) for b in self.cpus)

    def written(self) -> int:
        return sum(len(b.lines) + b.overrun for b in self.cpus)

    def resize(self, size_kb: int, cpu: int | None = None) -> None:
        """tracing_resize_ring_buffer: one CPU's buffer, or every CPU's (cpu None).  A
        smaller buffer drops its oldest lines, counted as overwritten."""
        for b in self.cpus if cpu is None else [self.cpus[cpu]]:
            b.size_kb = size_kb
            b.make_room(0)

    def size_kb(self, cpu: int | None = None) -> str:
        """buffer_size_kb: one CPU's size, or every CPU's when they agree ("X" if not)."""
        if cpu is not None:
            return f"{self.cpus[cpu].size_kb}\n"
        sizes = {b.size_kb for b in self.cpus}
        return f"{sizes.pop()}\n" if len(sizes) == 1 else "X\n"

    def total_size_kb(self) -> str:
        return f"{sum(b.size_kb for b in self.cpus)}\n"

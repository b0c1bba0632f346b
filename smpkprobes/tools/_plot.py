"""Pictures of a run (`--plot`), drawn with matplotlib when it is installed: the per-CPU
timeline of `_timeline`, and curves for scenarios whose point is a curve."""

from __future__ import annotations

from ._timeline import _Timeline, _us


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib, which is not installed: "
                              "pip install 'smpkprobes[plot]' (or matplotlib>=3.8)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


_CAT_COLOURS = {"kprobe": "#d62728", "kretprobe": "#9467bd", "handler": "#ff7f0e",
                "single_step": "#2ca02c"}


def plot_timeline(machine, out, title: str | None = None, start_ns: int = 0,
                  end_ns: int | None = None) -> None:
    """Draw the per-CPU timeline of a (short) run to `out` (a path; the format follows the
    suffix): tasks as coloured bars, probe hits, handlers and single-steps on top, misses
    and stray traps as markers, grace periods and text syncs on rows of their own."""
    plt = _pyplot()
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D

    tl = _Timeline(machine)
    end_ns = tl.end if end_ns is None else end_ns
    n = machine.ncpus
    rows = {"gp": n, "sync": n + 1}
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.55 * (n + 2)), dpi=100)
    comms = sorted({s.args.get("comm", "") for s in tl.slices if s.cat == "task"})
    cmap = plt.get_cmap("tab20")
    colour = {c: cmap((2 * i + 1) % 20) for i, c in enumerate(comms)}

    def bars(items, y, h, **kw):
        xs = [(_us(a), max(_us(b) - _us(a), 0.0)) for a, b in items]
        if xs:
            ax.broken_barh(xs, (y - h / 2, h), **kw)

    for comm in comms:
        for cpu in range(n):
            bars([(s.start, s.end) for s in tl.slices
                  if s.track == cpu and s.cat == "task" and s.args.get("comm") == comm],
                 cpu, 0.7, facecolors=colour[comm], edgecolors="white", linewidth=0.3)
    min_w = (end_ns - start_ns) / 1500 or 1
    for cat, h in (("kprobe", 0.5), ("kretprobe", 0.5), ("handler", 0.34), ("single_step", 0.2)):
        for cpu in range(n):
            bars([(s.start, max(s.end, s.start + min_w)) for s in tl.slices
                  if s.track == cpu and s.cat == cat], cpu, h, facecolors=_CAT_COLOURS[cat])
    marks = {"miss": ("x", "black"), "stray": ("*", "magenta"), "rp_miss": ("v", "purple"),
             "text_sync": ("|", "grey")}
    for cat, (marker, c) in marks.items():
        pts = [(_us(i.t), i.track) for i in tl.instants if i.cat == cat and i.track >= 0]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] + (0.42 if cat == "text_sync" else 0)
                                              for p in pts],
                       marker=marker, color=c, s=22 if cat != "text_sync" else 30, zorder=5,
                       linewidths=1)
    bars([(s.start, max(s.end, s.start + min_w)) for s in tl.spans if s.cat == "grace_period"],
         rows["gp"], 0.6, facecolors="#1f77b4", alpha=0.6)
    bars([(s.start, max(s.end, s.start + min_w)) for s in tl.spans if s.cat == "text_sync"],
         rows["sync"], 0.6, facecolors="#7f7f7f", alpha=0.6)
    ax.set_yticks(list(range(n + 2)), [f"CPU {c}" for c in range(n)] +
                  ["grace periods", "text syncs"])
    ax.set_ylim(n + 1.6, -0.6)
    ax.set_xlim(_us(start_ns), _us(end_ns) * 1.01 + 0.01)
    ax.set_xlabel("virtual time (µs; 1 ns per guest instruction)")
    ax.set_title(f"{title or 'smpkprobes'}: {machine.arch}, {n} CPUs, seed {machine.seed}"
                 f"{', preempt' if machine.preempt else ''}")
    handles = [Patch(facecolor=colour[c], label=c) for c in comms]
    handles += [Patch(facecolor=_CAT_COLOURS[k], label=lbl) for k, lbl in
                (("kprobe", "probe hit"), ("kretprobe", "kretprobe return"),
                 ("handler", "handler"), ("single_step", "single-step"))]
    handles += [Line2D([], [], marker=m_, color=c, linestyle="", label=lbl) for m_, c, lbl in
                (("x", "black", "miss"), ("*", "magenta", "stray trap"),
                 ("v", "purple", "kretprobe miss"), ("|", "grey", "IPI (sync_core)"))]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_curves(curves: dict, out, xlabel: str, ylabel: str, title: str,
                logx: bool = False) -> None:
    """One curve per entry, in order: `curves[label]` is a list of (x, y) points.  The
    maxactive_contention scenario draws nmissed against maxactive with it, one curve per
    CPU count."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(label))
    if logx:
        ax.set_xscale("log", base=2)
        xs = sorted({p[0] for pts in curves.values() for p in pts})
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def require_matplotlib() -> None:
    """Fail early, with the install hint, when `--plot` is asked for without matplotlib."""
    _pyplot()

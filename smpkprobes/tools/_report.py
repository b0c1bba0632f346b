"""`smpkprobes campaign list|show ID|report ID [--html FILE]`: what the campaign store holds.

`report` prints a text summary (seeds run, failure kinds, their shrunk replay commands) and
writes one self-contained HTML page with four matplotlib plots (embedded as PNG): seeds per
second over time, failures by kind over seeds, the first failing seed of each kind, and the
throughput of each worker.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
from collections import Counter, defaultdict
from pathlib import Path

from ._store import CampaignInfo, Store

WINDOW = 8      # chunks over which the seeds-per-second curve is averaged


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


def _title(c: CampaignInfo) -> str:
    return f"{c.scenario} {' '.join(c.arguments)}".strip()


def list_campaigns(store: Store, out=print) -> int:
    rows = store.campaigns()
    if not rows:
        out(f"no campaigns in {store.path}")
        return 0
    out(f"{'id':>4}  {'seeds':>8} {'failed':>7} {'kinds':>5}  {'arch':<8} {'policy':<8} "
        f"{'code':<16}  {'created':<23}  scenario and flags")
    for c in rows:
        n, bad = store.count(c.id)
        out(f"{c.id:>4}  {n:>8} {bad:>7} {len(store.kinds(c.id)):>5}  {c.arch:<8} "
            f"{c.policy:<8} {c.code_digest:<16}  {_when(c.created):<23}  {_title(c)}")
    return 0


def _ranges(seeds: list[int]) -> str:
    """"0:100, 200:250": the recorded seeds as half-open ranges."""
    out, start, prev = [], None, None
    for s in seeds:
        if start is None:
            start = prev = s
        elif s == prev + 1:
            prev = s
        else:
            out.append(f"{start}:{prev + 1}")
            start = prev = s
    if start is not None:
        out.append(f"{start}:{prev + 1}")
    return ", ".join(out) or "none"


def summary(store: Store, cid: int) -> list[str]:
    """The text summary of campaign `cid`."""
    c = store.campaign(cid)
    rows = store.seeds(cid)
    kinds = store.kinds(cid)
    bad = sum(1 for r in rows if r.kind is not None)
    busy = sum(r.seconds for r in rows)
    workers = {r.worker for r in rows}
    lines = [f"campaign {c.id}: {_title(c)}",
             f"  arch {c.arch}, schedule {c.policy}, smpkprobes {c.version}, code "
             f"{c.code_digest}, created {_when(c.created)}",
             f"  {len(rows)} seeds run ({_ranges([r.seed for r in rows])}), "
             f"{len(rows) - bad} passed, {bad} failed, {len(kinds)} kind(s) of failure; "
             f"{busy:.1f} s in runs on {len(workers)} worker(s), in "
             f"{len(store.sessions(cid))} session(s)"]
    for k in kinds:
        lines.append(f"  {k['count']} x {k['message']}")
        lines.append(f"    first seed {k['first_seed']}: "
                     + next(r.replay for r in rows if r.seed == k["first_seed"]))
        if k["shrunk"]:
            lines.append(f"    shrunk: {k['shrunk']}")
        else:
            lines.append("    not shrunk yet (run the campaign's stress command again to shrink)")
    return lines


def show(store: Store, cid: int, out=print) -> int:
    for line in summary(store, cid):
        out(line)
    return 0


# == the HTML report ======================================================================
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(store: Store, cid: int) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = store.seeds(cid)
    kinds = store.kinds(cid)
    short = {k["kind"]: f"K{i + 1}" for i, k in enumerate(kinds)}
    plots = []

    # 1. seeds per second over time: the client's clock when it recorded each chunk, the
    # rate over the last WINDOW chunks, from the start of each client session (so start-up
    # counts); a killed and resumed campaign shows the pause as a gap.
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot()
    starts = [t for t, _ in store.sessions(cid)]
    marks = sorted([(t, n, False) for t, n in Counter(r.recorded for r in rows).items()]
                   + [(t, 0, True) for t in starts])
    if rows:
        t0 = marks[0][0]
        xs, ys, start = [], [], 0
        for i, (t, _, session) in enumerate(marks):
            if session or i == 0:
                if xs:
                    xs.append(t - t0)
                    ys.append(float("nan"))
                start = i
                continue
            j = max(start, i - WINDOW)
            if i > j:
                seeds = sum(n for _, n, _ in marks[j + 1:i + 1])
                xs.append(t - t0)
                ys.append(seeds / max(t - marks[j][0], 1e-6))
        ax.plot(xs, ys, color="tab:blue", marker=".")
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
    ax.set_xlabel("seconds since the campaign started")
    ax.set_ylabel("seeds / s")
    ax.set_title("Seeds per second over time")
    fig.tight_layout()
    plots.append(("Seeds per second over time", _png(fig)))

    # 2. failures by kind over seeds (cumulative)
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot()
    by_kind = defaultdict(list)
    for r in rows:
        if r.kind is not None:
            by_kind[r.kind].append(r.seed)
    for k in kinds:
        seeds = by_kind[k["kind"]]
        ax.step(seeds, range(1, len(seeds) + 1), where="post", label=short[k["kind"]])
    if kinds:
        ax.legend(fontsize="small")
    ax.set_xlabel("seed")
    ax.set_ylabel("failures so far")
    ax.set_title("Failures by kind over seeds")
    fig.tight_layout()
    plots.append(("Failures by kind over seeds", _png(fig)))

    # 3. the first failing seed of each kind
    fig = Figure(figsize=(7, 0.8 + 0.4 * max(1, len(kinds))))
    ax = fig.add_subplot()
    ax.barh([short[k["kind"]] for k in kinds], [k["first_seed"] for k in kinds],
            color="tab:red")
    for i, k in enumerate(kinds):
        ax.annotate(str(k["first_seed"]), (k["first_seed"], i), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("first failing seed")
    ax.set_title("First failing seed of each kind" + ("" if kinds else " (no failures)"))
    fig.tight_layout()
    plots.append(("First failing seed of each kind", _png(fig)))

    # 4. throughput per worker: seeds per second of the worker's time in runs
    fig = Figure(figsize=(7, 0.8 + 0.45 * max(1, len({r.worker for r in rows}))))
    ax = fig.add_subplot()
    per = defaultdict(lambda: [0, 0.0])
    for r in rows:
        per[r.worker][0] += 1
        per[r.worker][1] += r.seconds
    names = sorted(per)
    rates = [per[w][0] / per[w][1] if per[w][1] else 0.0 for w in names]
    ax.barh(names, rates, color="tab:green")
    for i, w in enumerate(names):
        ax.annotate(f"{per[w][0]} seeds", (rates[i], i), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("seeds / s of run time")
    ax.set_title("Throughput per worker")
    fig.tight_layout()
    plots.append(("Throughput per worker", _png(fig)))
    return plots


def write_html(store: Store, cid: int, path: Path) -> None:
    c = store.campaign(cid)
    kinds = store.kinds(cid)
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>smpkprobes campaign "
             f"{c.id}</title><style>body{{font-family:sans-serif;max-width:62em;margin:1.5em "
             f"auto;color:#222}} pre,code{{background:#f4f4f4;padding:.1em .3em}} "
             f"pre{{padding:.6em;white-space:pre-wrap}} td,th{{border-bottom:1px solid #ddd;"
             f"padding:.3em .6em;text-align:left;vertical-align:top}} table{{border-collapse:"
             f"collapse}} img{{max-width:100%}} .grid{{display:grid;grid-template-columns:1fr "
             f"1fr;gap:1em}}</style></head><body>",
             f"<h1>Campaign {c.id}: <code>{esc(_title(c))}</code></h1>",
             "<pre>" + esc("\n".join(summary(store, cid))) + "</pre>",
             "<h2>Failure kinds</h2>"]
    if kinds:
        parts.append("<table><tr><th></th><th>failure</th><th>count</th><th>first seed</th>"
                     "<th>shrunk reproducer</th></tr>")
        for i, k in enumerate(kinds):
            parts.append(f"<tr><td>K{i + 1}</td><td>{esc(k['message'])}</td>"
                         f"<td>{k['count']}</td><td>{k['first_seed']}</td>"
                         f"<td><code>{esc(k['shrunk'] or 'not shrunk yet')}</code></td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No failures.</p>")
    parts.append("<h2>Plots</h2><div class='grid'>")
    for title, png in _plots(store, cid):
        parts.append(f"<figure><img alt='{esc(title)}' src='data:image/png;base64,{png}'>"
                     f"</figure>")
    parts.append("</div></body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


def report(store: Store, cid: int, html_path: str | None = None, out=print) -> int:
    store.campaign(cid)                     # a clear error for an unknown id
    path = Path(html_path or f"smpkprobes-campaign-{cid}.html")
    for line in summary(store, cid):
        out(line)
    write_html(store, cid, path)
    out(f"report: {path}")
    return 0

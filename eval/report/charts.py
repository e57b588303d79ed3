"""Pareto charts (matplotlib): quality against throughput and against peak memory, per engine.

Every model is one point, labelled with its name; Pareto-optimal points (pareto.mark_pareto:
on throughput by the paired speedups' ranges, so a difference inside the noise is a tie) are
drawn as filled stars joined by the front line. In the SVG each point is its own element with the id
``point-<axis>-<n>``, n the row's index in the table (engines have panels of their own), so
the HTML report links chart and table and a browser test can count the points.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from eval.report.compare import Group  # noqa: E402
from eval.report.pareto import THROUGHPUT, Axis, value  # noqa: E402

plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "squeeze", "font.size": 8})


def _panel(ax, rows: list[dict], quality: Axis, x: Axis, engine: str, name: str) -> None:
    pts = [(n, r, value(r, x), value(r, quality)) for n, r in enumerate(rows) if r["engine"] == engine
           and not r["error"]]
    pts = [(n, r, px, py) for n, r, px, py in pts if px is not None and py is not None]
    ax.set_title(f"{engine}: {quality.label.split(' (')[0]} vs {x.label.split(' (')[0]}")
    ax.set_xlabel(x.label)
    ax.set_ylabel(quality.label)
    ax.grid(True, alpha=0.3)
    if not pts:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    # the stars are the rows' Pareto flags (pareto.mark_pareto): on throughput a difference inside the
    # paired speedups' noise is a tie, so being drawn further right earns no star by itself
    front = {i for i, (_, r, _, _) in enumerate(pts) if r.get("pareto", {}).get(name)}
    for i, (n, r, px, py) in enumerate(pts):
        opt = i in front
        ax.scatter([px], [py], s=90 if opt else 40, marker="*" if opt else "o",
                   c="#d62728" if opt else ("#1f77b4" if not r["baseline"] else "#2ca02c"),
                   edgecolors="black", linewidths=0.5, zorder=3, gid=f"point-{name}-{n}")
        ax.annotate(r["artifact"] if not r["baseline"] else "baseline", (px, py), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
    fp = sorted(((px, py) for i, (_, _, px, py) in enumerate(pts) if i in front))
    if len(fp) > 1:
        ax.plot([p[0] for p in fp], [p[1] for p in fp], color="#d62728", alpha=0.5, lw=1, zorder=2)
    ys = [py for *_, py in pts]
    if quality.key == "perplexity" and min(ys) > 0 and max(ys) / min(ys) > 3:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    if not quality.maximize:  # lower perplexity is better: put better at the top
        ax.invert_yaxis()


def pareto_figure(g: Group, fmt: str = "svg", path: Path | None = None) -> str | None:
    """One figure, a row of two panels per engine (quality vs throughput, vs memory); SVG text
    (fmt='svg') or a PNG written to `path`."""
    engines = list(dict.fromkeys(r["engine"] for r in g.rows))
    fig, axes = plt.subplots(len(engines), 2, figsize=(11, 4.2 * len(engines)), squeeze=False)
    for k, engine in enumerate(engines):
        _panel(axes[k][0], g.rows, g.quality, THROUGHPUT, engine, "throughput")
        _panel(axes[k][1], g.rows, g.quality, g.memory, engine, "memory")
    fig.tight_layout()
    try:
        if fmt == "png":
            fig.savefig(path, format="png", dpi=110)
            return None
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        svg = buf.getvalue()
        return svg[svg.index("<svg"):]  # drop the XML prolog: the SVG goes inline into HTML
    finally:
        plt.close(fig)


def point_ids(svg: str) -> list[str]:
    return re.findall(r'id="(point-[^"]+)"', svg)

"""Plots of an estimate: latency vs request rate with the SLO lines, and cost per option.

Written to PNG (matplotlib, Agg backend) or to a self-contained HTML page with the figure
inlined as SVG (no scripts, no CDN). matplotlib is imported only here, only when plotting.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from estimator.capacity import Slo
from estimator.report import Alternative, CurvePoint

SUFFIXES = (".png", ".html", ".htm")
_MAX_BARS = 12


def available() -> bool:
    """matplotlib is installed (the ``plot`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def check_path(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix.lower() not in SUFFIXES:
        raise ValueError(f"plot file must end in .png or .html, got {p.name!r}")
    return p


def figure(
    curve: Sequence[CurvePoint], slo: Slo, alternatives: Sequence[Alternative], *, title: str,
    rate_rps: float | None = None, capacity_rps: float | None = None,
) -> Any:  # fmt: skip
    """A two-panel matplotlib figure (latency vs rate per replica; $/hour per option)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax, bx = fig.subplots(1, 2, width_ratios=(1.1, 1))
    _latency_panel(ax, curve, slo, rate_rps, capacity_rps)
    _cost_panel(bx, alternatives)
    fig.suptitle(title)
    return fig


def _latency_panel(ax: Any, curve: Sequence[CurvePoint], slo: Slo, rate: float | None,
                   capacity: float | None) -> None:  # fmt: skip
    pts = [s for s in curve if s.ttft_p95_s is not None and s.itl_p95_s is not None]
    rates = [s.rate_rps for s in pts]
    q = f"p{slo.quantile * 100:g}"
    ax.plot(rates, [s.ttft_p95_s for s in pts], "o-", color="tab:blue", label=f"TTFT {q}")
    ax.axhline(slo.ttft_p95_s, color="tab:blue", ls="--", lw=1, label=f"TTFT SLO {slo.ttft_p95_s}s")
    ax.set_xlabel("request rate per replica (req/s)")
    ax.set_ylabel("TTFT (s)", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(
        rates, [s.itl_p95_s for s in pts], "s-", color="tab:red", label=f"ITL {q} (all token gaps)"
    )
    ax2.axhline(slo.itl_p95_s, color="tab:red", ls=":", lw=1, label=f"ITL SLO {slo.itl_p95_s}s")
    ax2.set_ylabel("ITL (s)", color="tab:red")
    ax2.set_ylim(bottom=0)
    if capacity:
        ax.axvline(capacity, color="black", lw=1, alpha=0.6, label="capacity at SLO")
    if rate:
        ax.axvline(rate, color="green", lw=1, alpha=0.6, label="offered rate")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper left")
    ax.set_title("latency vs load (one replica)", fontsize=10)


def _cost_panel(ax: Any, alternatives: Sequence[Alternative]) -> None:
    alts = list(alternatives)[:_MAX_BARS]
    if not alts:
        ax.text(0.5, 0.5, "no alternatives", ha="center", va="center")
        ax.set_axis_off()
        return
    labels = [a.label() + (" (now)" if a.current else "") for a in alts][::-1]
    values = [a.usd_per_hour if a.meets_slo else 0.0 for a in alts][::-1]
    colors = ["tab:green" if a.meets_slo else "tab:gray" for a in alts][::-1]
    ax.barh(labels, values, color=colors)
    ax.set_xlabel("USD/hour for the forecast peak (none: misses the SLO or does not fit)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("cost per option, cheapest first", fontsize=10)


def write(fig: Any, path: str | Path, *, title: str, summary: str = "") -> Path:
    """Write ``fig`` to ``path``: PNG, or HTML with the figure inlined as SVG."""
    p = check_path(path)
    if p.suffix.lower() == ".png":
        fig.savefig(p, dpi=110)
        return p
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    svg = svg[svg.find("<svg") :]  # drop the XML prolog and doctype: inline SVG in HTML
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n{svg}\n<pre>{html.escape(summary)}</pre>\n</body></html>\n"
    )
    p.write_text(page, encoding="utf-8")
    return p

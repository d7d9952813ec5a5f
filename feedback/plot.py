"""Plots of a report: the primary metric over time with intervals, and the posterior of the
difference to control. PNG via matplotlib's Agg canvas (no pyplot, no global state); a path
ending in .html gets a self-contained page with the table and the embedded PNG."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from feedback.report import Report


def render_png(report: Report) -> bytes:
    """The figure as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    exp = report.experiment
    fig = Figure(figsize=(12, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for arm in report.arms:
        pts = [p for p in report.daily if p.arm == arm.name]
        if not pts:
            continue
        days = [p.day for p in pts]
        left.plot(
            days,
            [p.metric for p in pts],
            marker="o",
            label=arm.name + (" (control)" if arm.name == exp.control else ""),
        )
        left.fill_between(days, [p.ci[0] for p in pts], [p.ci[1] for p in pts], alpha=0.2)
    left.set_title(f"{exp.primary_metric} (cumulative, 95% interval)")
    left.set_xlabel("day (UTC)")
    left.tick_params(axis="x", labelrotation=30)
    if report.daily:
        left.legend(loc="best")
    for name, samples in report.diff_samples.items():
        if len(samples) and np.isfinite(samples).all():
            right.hist(samples, bins=80, density=True, alpha=0.5, label=f"{name} - {exp.control}")
    right.axvline(0.0, color="black", linewidth=1)
    right.set_title("posterior of the difference to control")
    if report.diff_samples:
        right.legend(loc="best")
    fig.suptitle(f"experiment {exp.id} on {exp.alias}: {report.decision}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_plot(report: Report, path: Path | str) -> Path:
    """Write the plot to ``path`` (.png, or .html with the table included); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = render_png(report)
    if path.suffix.lower() in (".html", ".htm"):
        page = (
            "<!doctype html><meta charset='utf-8'>"
            f"<title>experiment {html.escape(report.experiment.id)}</title>"
            f"<pre>{html.escape(report.to_table())}</pre>"
            f"<img alt='report plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        )
        path.write_text(page, encoding="utf-8")
    else:
        path.write_bytes(png)
    return path

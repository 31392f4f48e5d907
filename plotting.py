"""Figures, drawn headless and returned as image bytes for the caller to write.

Figures are built with matplotlib's object API (``Figure``), not pyplot: no global figure
state, no display needed, nothing to close."""
from __future__ import annotations

import io
import math
from typing import Sequence

from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def layerwise_figure_bytes(
    curves: Sequence[tuple[str, Sequence[float], float]], fmt: str = "png", xlabel: str = "layer"
) -> bytes:
    """Layer-wise transferability, one line with markers per ``(label, values, mean)``.

    Points are numbered from 1 in forward order. Infinite values (frozen layers) leave a
    gap in the line and are counted in the legend. One curve is titled with its mean, as
    in the paper's figure; several curves carry their means in the legend.
    """
    fig = Figure(figsize=(6.4, 4.4), dpi=150)
    ax = fig.subplots()
    for label, values, mean in curves:
        xs = range(1, len(values) + 1)
        ys = _gaps_for_infinite(values)
        frozen = sum(1 for v in values if not math.isfinite(v))
        text = f"{label} (mean {mean:.2f})" + (f", {frozen} frozen" if frozen else "")
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5, label=text)
    if len(curves) == 1:
        ax.set_title(f"Transferability (mean {curves[0][2]:.2f})")
    else:
        ax.set_title("Transferability")
    if len(curves) > 1 or any(not math.isfinite(v) for _, values, _ in curves for v in values):
        ax.legend(fontsize="small")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("transferability")
    ax.grid(alpha=0.3)
    return _encode(fig, fmt)


def figure_format(path: str) -> str | None:
    """The image format a figure path asks for (by suffix), or None if matplotlib lacks it."""
    fmt = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    return fmt if fmt in FigureCanvasBase.get_supported_filetypes() else None


def layerwise_grid_bytes(panels: Sequence[tuple[str, Sequence[float]]], fmt: str = "png", xlabel: str = "Block",
                         columns: int = 6) -> bytes:
    """One small panel per ``(title, values)``: T per point against its position, as in the
    paper's grids of layer-wise transferability (one panel per downstream dataset)."""
    count = max(len(panels), 1)
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(2.6 * columns, 2.3 * rows), dpi=150)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, (title, values) in zip(axes.flat, panels):
        xs = range(1, len(values) + 1)
        ys = _gaps_for_infinite(values)
        ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.4, color="black")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(r"$T_{FB}(\theta_A)$", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return _encode(fig, fmt)


def _encode(fig: Figure, fmt: str) -> bytes:
    """The figure as image bytes in ``fmt``."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt)
    return buffer.getvalue()


def _gaps_for_infinite(values: Sequence[float]) -> list[float]:
    """Infinite values (frozen layers) become NaN, which matplotlib leaves as a gap."""
    return [v if math.isfinite(v) else math.nan for v in values]

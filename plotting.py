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


# Above this ratio of the largest to the smallest positive T on a figure, its y axis is
# logarithmic: one layer decades above the rest would otherwise flatten every other point.
LOG_AXIS_SPAN = 30.0
# Up to this many points the x axis names every layer; beyond, it numbers them.
NAMED_TICKS = 24


def layerwise_figure_bytes(
    curves: Sequence[tuple[str, Sequence[float], float]], fmt: str = "png", xlabel: str = "layer",
    ylabel: str = "transferability", title: str = "Transferability",
    dashed: Sequence[tuple[str, Sequence[float], float]] | None = None,
    layer_names: Sequence[str] | None = None, is_head: Sequence[bool] | None = None,
) -> bytes:
    """Layer-wise transferability, one line with markers per ``(label, values, mean)``.

    Points are numbered from 1 in forward order; with ``layer_names`` the x axis names them
    (up to :data:`NAMED_TICKS` points), the first marked as the stem. Points where ``is_head``
    is true (the new classifier head, 1.0 by definition) are drawn apart, as hollow grey
    markers not joined to the measured curve. A dotted line marks T = 1 (theta_A no closer
    to theta_FB than theta_r). The y axis is logarithmic when the positive values span more
    than :data:`LOG_AXIS_SPAN`. Infinite values (frozen layers) leave a gap in the line and
    are counted in the legend. One curve is titled with its mean, as in the paper's figure;
    several curves carry their means in the legend. ``dashed`` holds one more curve per curve
    (the scale-free T), drawn dashed in the same colour; the title then carries both means
    of a single pair.
    """
    fig = Figure(figsize=(7.2, 4.8), dpi=150)
    ax = fig.subplots()
    count = max((len(values) for _, values, _ in curves), default=0)
    head = list(is_head) if is_head is not None else [False] * count
    body = [i for i in range(count) if not head[i]]
    xs = [i + 1 for i in body]
    pairs = list(zip(curves, dashed)) if dashed is not None else [(curve, None) for curve in curves]
    for (label, values, mean), extra in pairs:
        (line,) = ax.plot(xs, _gaps_for_infinite([values[i] for i in body]), marker="o", markersize=4,
                          linewidth=1.5, label=_legend_text(label, values, mean), gid="curve")
        if extra is not None:
            extra_label, extra_values, extra_mean = extra
            ax.plot(xs, _gaps_for_infinite([extra_values[i] for i in body]), marker="o", markersize=3,
                    linewidth=1.2, linestyle="--", color=line.get_color(), gid="curve",
                    label=_legend_text(f"{extra_label}, scale-free", extra_values, extra_mean))
    heads = [i + 1 for i in range(count) if head[i]]
    if heads:
        ax.plot(heads, [1.0] * len(heads), marker="o", markersize=6, markerfacecolor="none", color="0.45",
                linestyle="none", label="head (new for the target: 1 by definition, not in the mean)", gid="head")
    ax.axhline(1.0, color="0.35", linewidth=0.9, linestyle=":", gid="t_equals_1",
               label="T = 1: theta_A no closer to theta_FB than theta_r")
    if len(curves) == 1:
        means = f"mean {curves[0][2]:.2f}" + (f"; scale-free {dashed[0][2]:.2f}" if dashed else "")
        ax.set_title(f"{title} ({means})")
    else:
        ax.set_title(title)
    everything = [*curves, *(dashed or [])]
    positive = [v for _, values, _ in everything for i, v in enumerate(values)
                if i < count and not head[i] and math.isfinite(v) and v > 0]
    if positive and max(positive) > LOG_AXIS_SPAN * min(positive):
        ax.set_yscale("log")
        ylabel += " (log scale)"
    ax.legend(fontsize="small")
    if layer_names is not None and len(layer_names) == count and count <= NAMED_TICKS:
        names = [("head: " if head[i] else "stem: " if i == 0 else "") + plain_text(name)
                 for i, name in enumerate(layer_names)]
        ax.set_xticks(range(1, count + 1), names, rotation=45, ha="right", fontsize=7)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if count:
            xlabel += f" (1 = the stem{f', {count} = the head' if head and head[-1] else ''})"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return _encode(fig, fmt)


def plain_text(text: object) -> str:
    """A label from the user's data (a file name, a --labels entry, a data set name) as text
    matplotlib draws as it is: a ``$`` is not the start of a formula (an unbalanced one would
    fail the drawing), and bytes of a file name that are not valid UTF-8 become U+FFFD."""
    text = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text.replace("$", r"\$")


def _legend_text(label: str, values: Sequence[float], mean: float) -> str:
    """``label (mean X)``, with the count of infinite (frozen) points when there are any."""
    frozen = sum(1 for v in values if math.isinf(v))
    return f"{plain_text(label)} (mean {mean:.2f})" + (f", {frozen} frozen" if frozen else "")


def figure_format(path: str) -> str | None:
    """The image format a figure path asks for (by suffix), or None if matplotlib lacks it."""
    fmt = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    return fmt if fmt in figure_formats() else None


def figure_formats() -> list[str]:
    """The image formats matplotlib writes (png, pdf, svg, jpg, ...), sorted."""
    return sorted(FigureCanvasBase.get_supported_filetypes())


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
        ax.set_title(plain_text(title), fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(r"$T_{FB}(\theta_A)$", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return _encode(fig, fmt)


def knob_panels_bytes(panels: Sequence[tuple[str, Sequence[tuple[str, Sequence[Sequence[float]]]]]],
                      layer_names: Sequence[str], fmt: str = "png", has_head: bool = True) -> bytes:
    """Layer-wise transferability of a study, one panel per knob with its levels overlaid.

    ``panels`` holds ``(title, levels)``; each level is ``(label, curves)``, one curve per
    seed, the last point of each the head when ``has_head`` (a ViT's curves have none). Per
    level: the mean over seeds (line and markers) and the range over seeds (a band). The panels
    share one y scale. The head point (1.0 by definition: fine-tuning replaces the head) is
    drawn apart, as a hollow grey marker not joined to the measured curve.
    """
    count = max(len(panels), 1)
    fig = Figure(figsize=(3.6 * count, 3.4), dpi=150)
    axes = fig.subplots(1, count, sharey=True, squeeze=False)[0]
    points = len(layer_names)
    measured = points - 1 if has_head else points  # the points drawn as curves
    for ax, (title, levels) in zip(axes, panels):
        for colour, (label, curves) in zip(_COLOURS, levels):
            body = [[v if math.isfinite(v) else math.nan for v in curve[:measured]] for curve in curves]
            if not body:
                continue
            xs = list(range(1, measured + 1))
            columns = list(zip(*body))
            mean = [math.fsum(c) / len(c) for c in columns]
            ax.fill_between(xs, [min(c) for c in columns], [max(c) for c in columns], color=colour, alpha=0.18,
                            linewidth=0)
            ax.plot(xs, mean, marker="o", markersize=3, linewidth=1.3, color=colour,
                    label=label + (f" ({len(curves)} seeds)" if len(curves) > 1 else ""))
        if has_head:
            ax.plot([points], [1.0], marker="o", markersize=5, markerfacecolor="none", color="0.45",
                    linestyle="none", label="head (1 by definition)" if ax is axes[0] else None)
            ax.axvline(points - 0.5, color="0.85", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper right")
    axes[0].set_ylabel(r"transferability $T_{FB}(\theta_A)$", fontsize=8)
    head = f", {points} = head" if has_head else " (no head point)"
    fig.suptitle(f"Layer-wise transferability: mean over seeds, band = range over seeds; layers 1-{measured} "
                 f"({layer_names[0]} ... {layer_names[measured - 1]}){head}", fontsize=8)
    return _encode(fig, fmt)


_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _encode(fig: Figure, fmt: str) -> bytes:
    """The figure as image bytes in ``fmt``."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt)
    return buffer.getvalue()


def _gaps_for_infinite(values: Sequence[float]) -> list[float]:
    """Infinite values (frozen layers) become NaN, which matplotlib leaves as a gap."""
    return [v if math.isfinite(v) else math.nan for v in values]

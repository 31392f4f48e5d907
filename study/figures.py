"""The study's figure of its pre-training regimes: T, the scale-free T and the shrinking of
the weights per layer, one colour per regime (matplotlib's object API, returned as bytes)."""
from __future__ import annotations

import math
import statistics
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from plotting import _encode

COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:purple")


def _band(curves: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Median, minimum and maximum per point over ``curves`` (non-finite values left out)."""
    columns = [[v for v in column if v is not None and math.isfinite(v)] for column in zip(*curves)]
    return ([statistics.median(c) if c else math.nan for c in columns], [min(c) if c else math.nan for c in columns],
            [max(c) if c else math.nan for c in columns])


def regimes_figure_bytes(regimes: Sequence[dict], layer_names: Sequence[str], fmt: str = "png") -> bytes:
    """Three panels, one line per regime (``{"name", "T": curves, "T_scale_free": curves,
    "shrink": values}``, each curve without its head): T and the scale-free T per layer (the
    median over the regime's runs, the band their range), and shrink = mean|theta_r| /
    mean|theta_A| per layer. Log y axes: the layers span decades."""
    fig = Figure(figsize=(13.0, 3.9), dpi=150)
    axes = fig.subplots(1, 3)
    xs = list(range(1, len(layer_names) + 1))
    titles = ("T (the paper's metric)", "scale-free T (tensors divided by their RMS)",
              "shrink = mean|theta_r| / mean|theta_A|")
    for colour, regime in zip(COLOURS, regimes):
        for ax, key in zip(axes[:2], ("T", "T_scale_free")):
            median, low, high = _band(regime[key])
            ax.fill_between(xs, low, high, color=colour, alpha=0.18, linewidth=0)
            ax.plot(xs, median, marker="o", markersize=3, linewidth=1.3, color=colour,
                    label=f"{regime['name']} ({len(regime[key])} runs)")
        axes[2].plot(xs, regime["shrink"], marker="s", markersize=3, linewidth=1.3, color=colour, label=regime["name"])
    for ax, title in zip(axes, titles):
        ax.set_yscale("log")
        ax.axhline(1.0, color="0.5", linewidth=0.8, linestyle=":")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"layer (1 = stem {layer_names[0]}, {len(layer_names)} = {layer_names[-1]}; no head)", fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.suptitle("Pre-training regimes: median over the fine-tuned runs (band: their range); dotted: 1", fontsize=8)
    return _encode(fig, fmt)

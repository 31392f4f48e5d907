"""The main job's figure: layers named (stem first, head apart), T = 1 marked, and a log axis
when one layer lies decades above the others (plotting.layerwise_figure_bytes)."""
from __future__ import annotations

import pytest

import plotting


@pytest.fixture
def drawn(monkeypatch):
    figures = []
    monkeypatch.setattr(plotting, "_encode", lambda fig, fmt: figures.append(fig) or b"image")
    return figures


NAMES = ["conv1", "layer1.0", "layer2.0", "layer3.0", "fc"]
HEAD = [False, False, False, False, True]


def draw(drawn, values, **kwargs):
    plotting.layerwise_figure_bytes([("run", values, 1.0)], layer_names=NAMES, is_head=HEAD, **kwargs)
    [fig] = drawn
    [ax] = fig.axes
    return ax


def test_layers_are_named_the_stem_and_head_marked_and_t_equals_one_drawn(drawn):
    ax = draw(drawn, [2.0, 5.0, 4.0, 3.0, 1.0])
    labels = [tick.get_text() for tick in ax.get_xticklabels()]
    assert labels == ["stem: conv1", "layer1.0", "layer2.0", "layer3.0", "head: fc"]
    gids = {line.get_gid(): line for line in ax.get_lines()}
    assert list(gids["curve"].get_ydata()) == [2.0, 5.0, 4.0, 3.0]  # the head is not joined to the curve
    assert list(gids["head"].get_xdata()) == [5]
    assert list(gids["t_equals_1"].get_ydata()) == [1.0, 1.0]
    assert ax.get_yscale() == "linear"
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert any(text.startswith("head") for text in legend) and any(text.startswith("T = 1") for text in legend)


def test_a_layer_decades_above_the_rest_gets_a_log_axis(drawn):
    ax = draw(drawn, [17.45, 208.08, 45305.95, 163.39, 1.0])
    assert ax.get_yscale() == "log" and "log scale" in ax.get_ylabel()


def test_the_log_axis_threshold(drawn):
    low = 2.0
    ax = draw(drawn, [low, low * plotting.LOG_AXIS_SPAN * 0.99, low, low, 1.0])
    assert ax.get_yscale() == "linear"
    drawn.clear()
    ax = draw(drawn, [low, low * plotting.LOG_AXIS_SPAN * 1.01, low, low, 1.0])
    assert ax.get_yscale() == "log"


def test_many_layers_are_numbered_with_the_stem_and_head_in_the_axis_label(drawn):
    count = plotting.NAMED_TICKS + 1
    plotting.layerwise_figure_bytes([("run", [2.0] * (count - 1) + [1.0], 2.0)],
                                    layer_names=[f"l{i}" for i in range(count)], is_head=[False] * (count - 1) + [True])
    [ax] = drawn[0].axes
    assert ax.get_xlabel() == f"layer (1 = the stem, {count} = the head)"

"""Why a transferability measurement may not mean what it seems to: one line per problem.

T = D(theta_r, theta_FB) / D(theta_A, theta_FB) is a ratio of distances, and four ways a run
can go wrong give numbers that look like results (docs/metric.md, "When T means something"):

* ``stayed_home``: pre-training barely left the initialisation (median ``cos_init`` above
  :data:`COS_INIT_WARNING`), so theta_r and theta_A are nearly one point;
* ``barely_moved``: fine-tuning moved a layer by a tiny fraction of what it moved the median
  layer (``ft_move`` below :data:`BARELY_MOVED` of the median), typically a layer whose
  BatchNorm scales weight decay drove to zero in pre-training: its T is a large number about a
  layer that did not learn, not about transfer;
* ``dominant``: one layer's T is more than :data:`DOMINANT` times the median layer's, so the
  overall mean mostly reports that layer;
* ``not_descended``: T < 1 in every layer, i.e. theta_FB is closer to theta_r than to theta_A
  everywhere: it was very likely not fine-tuned from theta_A (trained from scratch, or from
  other weights);
* ``saturated``: the fine-tuning's own log (``B.log.jsonl`` beside ``B.pth``, named by
  :func:`engine.checkpoint.run_files`) shows validation
  accuracy at :data:`SATURATED_ACC` % or more, so the best-epoch checkpoint is the first epoch
  that got there, an early snapshot of a task too easy to tell layers apart.

Each check is a pure function of the measured numbers (or of the log) and returns
:class:`Problem` objects; the scripts print them and write them into their JSON.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .transferability import COS_INIT_WARNING, HEAD, Transferability

BARELY_MOVED = 0.01  # a layer's ft_move below this fraction of the median layer's
DOMINANT = 20.0  # a layer's T above this multiple of the median layer's T
SATURATED_ACC = 99.5  # validation accuracy (%) from which a fine-tuning target counts as saturated


@dataclass(frozen=True)
class Problem:
    """One reason a measurement may not mean what it seems to."""

    kind: str  # stayed_home, barely_moved, dominant, not_descended or saturated
    message: str  # one line, for the printout and the JSON
    layer: str | None = None  # the layer it concerns, when it is one layer

    def as_json(self) -> dict:
        return {"kind": self.kind, "layer": self.layer, "message": self.message}


def _measured(result: Transferability):
    """The layers that carry a finite T: not the head, not frozen."""
    return [layer for layer in result.layers if layer.status != HEAD and math.isfinite(layer.transferability)]


def pretraining_problems(result: Transferability) -> list[Problem]:
    """theta_A still close to theta_r (the same for every theta_FB of one theta_r, theta_A)."""
    median = result.median_cos_init
    if math.isfinite(median) and median > COS_INIT_WARNING:
        return [Problem("stayed_home",
                        f"theta_A is still close to theta_r (median cosine similarity {median:.2f} over the layers, "
                        f"cos_init with -v); T is only meaningful when pre-training left the initialisation")]
    return []


def finetuning_problems(result: Transferability) -> list[Problem]:
    """Layers fine-tuning could not move, layers that dominate the mean, and a theta_FB that
    is not descended from theta_A."""
    layers = _measured(result)
    if not layers:
        return []
    if all(layer.transferability < 1.0 for layer in layers):
        # the layers' ratios compare theta_FB with two points it did not start from: nothing
        # more to say about any one of them
        return [Problem(
            "not_descended",
            f"T < 1 in every layer (overall {result.overall:.2f}): theta_FB is closer to theta_r than to theta_A "
            f"everywhere, so it was very likely not fine-tuned from -a (trained from scratch, or from other "
            f"weights); give -b a checkpoint fine-tuned from -a")]
    problems = []
    moves = [layer.ft_move for layer in layers if layer.ft_move is not None and math.isfinite(layer.ft_move)]
    median_move = statistics.median(moves) if moves else math.nan
    median_t = statistics.median(layer.transferability for layer in layers)
    for layer in layers:
        t = layer.transferability
        mean_without = _mean_without(layers, layer)
        without = f"; the overall mean without it: {mean_without:.2f}" if math.isfinite(mean_without) else ""
        if (layer.ft_move is not None and median_move > 0 and math.isfinite(median_move)
                and layer.ft_move < BARELY_MOVED * median_move):
            problems.append(Problem(
                "barely_moved",
                f"{layer.name}: fine-tuning barely moved it (D(theta_A, theta_FB) = {layer.d_pretrained:.3g}, "
                f"{layer.ft_move / median_move:.2g} of the median layer's move relative to its size), so its "
                f"T = {t:.4g} says it did not learn, not that it transfers (BatchNorm scales decayed to zero in "
                f"pre-training? keep --norm_weight_decay small){without}", layer.name))
        elif len(layers) > 2 and median_t > 0 and t > DOMINANT * median_t:
            problems.append(Problem(
                "dominant",
                f"{layer.name}: T = {t:.4g} is {t / median_t:.0f} times the median layer's ({median_t:.3g}) and "
                f"dominates the overall mean{without}", layer.name))
    return problems


def _mean_without(layers, left_out) -> float:
    kept = [layer.transferability for layer in layers if layer is not left_out]
    return math.fsum(kept) / len(kept) if kept else math.nan


def saturation_problems(log: Path) -> list[Problem]:
    """A fine-tuning whose own log (``log``: the run's ``B.log.jsonl``) shows a saturated
    validation accuracy. A checkpoint without a readable log (another tool's, or a moved file)
    is not judged."""
    try:
        history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly nested JSON
        return []
    accuracies = [(entry.get("epoch"), entry.get("val_acc")) for entry in history if isinstance(entry, dict)]
    accuracies = [(e, a) for e, a in accuracies if isinstance(e, int) and isinstance(a, (int, float))]
    if not accuracies:
        return []
    best = max(a for _, a in accuracies)
    if best < SATURATED_ACC:
        return []
    first = min(e for e, a in accuracies if a == best)
    last = max(e for e, _ in accuracies)
    return [Problem(
        "saturated",
        f"the fine-tuning's log ({log.name}) reaches {best:.1f} % validation accuracy at epoch {first} of {last}: "
        f"the target is saturated and the best-epoch checkpoint is that early snapshot; fine-tune on a harder "
        f"target (fewer samples, more intraclass variance) for a T that tells layers apart")]

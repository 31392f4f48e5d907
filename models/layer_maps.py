"""Layer maps: which weight tensors make up each "layer" (point) of the transferability curve.

A layer map turns a state dict's names into an ordered list of :class:`LayerGroup`s, in
forward order; each architecture's ``models.Family`` names its function. The rules (see
docs/architectures.md for how they make the points of the T curve and how to add one):

* ResNet (torchvision and the CIFAR ResNets): the stem ``conv1.weight``; one point per
  residual block holding its ``convK.weight`` tensors (the downsample shortcut, BN and
  biases are not counted); the head ``fc.weight``.
* DenseNet: ``features.conv0.weight``; one point per dense layer (``conv1`` and
  ``conv2``); one per transition conv; the head ``classifier.weight``.
* ViT (torchvision): one point per encoder block holding the attention in-projection,
  out-projection and the two MLP weights. No head point.
* Anything else (:func:`generic_layer_groups`): every weight of 2+ dimensions, grouped by
  the numbered block it sits in; the last point is taken to be the head.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch


@dataclass(frozen=True)
class LayerGroup:
    """One point of the curve: a display name and the state-dict keys it averages over.

    ``is_head`` marks the classifier that fine-tuning replaces: its transferability is 1.0
    by definition and it is left out of the overall mean.
    """

    name: str
    keys: tuple[str, ...]
    is_head: bool = False


def _natural_key(text: str) -> tuple:
    """Sort key that orders ``layer10`` after ``layer9`` and ``mlp.3`` after ``mlp.0``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def _grouped(matches: list[tuple[tuple, str, str]]) -> list[LayerGroup]:
    """``(sort_key, group_name, tensor_key)`` triples -> groups ordered by sort key."""
    groups: dict[str, tuple[tuple, list[str]]] = {}
    for order, name, key in matches:
        groups.setdefault(name, (order, []))[1].append(key)
    ordered = sorted(groups.items(), key=lambda item: item[1][0])
    return [LayerGroup(name, tuple(sorted(keys, key=_natural_key))) for name, (_, keys) in ordered]


def _head(keys: Sequence[str], key: str, name: str) -> list[LayerGroup]:
    return [LayerGroup(name, (key,), is_head=True)] if key in keys else []


_RESNET_BLOCK = re.compile(r"^(layer(\d+)\.(\d+))\.conv\d+\.weight$")


def resnet_layer_groups(keys: Sequence[str]) -> list[LayerGroup]:
    matches = []
    for key in keys:
        m = _RESNET_BLOCK.match(key)
        if m:
            matches.append(((int(m[2]), int(m[3])), m[1], key))
    stem = [LayerGroup("conv1", ("conv1.weight",))] if "conv1.weight" in keys else []
    return stem + _grouped(matches) + _head(keys, "fc.weight", "fc")


_DENSE_LAYER = re.compile(r"^(features\.denseblock(\d+)\.denselayer(\d+))\.conv[12]\.weight$")
_TRANSITION = re.compile(r"^(features\.transition(\d+))\.conv\.weight$")


def densenet_layer_groups(keys: Sequence[str]) -> list[LayerGroup]:
    matches = []
    for key in keys:
        if m := _DENSE_LAYER.match(key):
            matches.append(((int(m[2]), 0, int(m[3])), m[1], key))
        elif m := _TRANSITION.match(key):
            matches.append(((int(m[2]), 1, 0), m[1], key))
    stem = [LayerGroup("features.conv0", ("features.conv0.weight",))]
    stem = stem if "features.conv0.weight" in keys else []
    return stem + _grouped(matches) + _head(keys, "classifier.weight", "classifier")


_VIT_BLOCK = re.compile(
    r"^(encoder\.layers\.encoder_layer_(\d+))\."
    r"(self_attention\.in_proj_weight|self_attention\.out_proj\.weight|mlp\.[^.]+\.weight)$"
)


def _vit_tensor_order(key: str) -> tuple:
    """in_proj < out_proj < first MLP weight < second MLP weight: the forward order."""
    for rank, part in enumerate(("in_proj_weight", "out_proj.weight")):
        if key.endswith(part):
            return (rank,)
    return (2,) + _natural_key(key)


def vit_layer_groups(keys: Sequence[str]) -> list[LayerGroup]:
    matches = [((int(m[2]),), m[1], key) for key in keys if (m := _VIT_BLOCK.match(key))]
    return [LayerGroup(g.name, tuple(sorted(g.keys, key=_vit_tensor_order))) for g in _grouped(matches)]


def generic_layer_groups(state_dict: Mapping[str, torch.Tensor]) -> list[LayerGroup]:
    """Grouping for any model: see docs/metric.md, section "Layer maps".

    Every tensor whose name ends in ``weight`` and that has 2+ dimensions (conv, linear,
    embedding) is used. Tensors inside a numbered block (the name up to its first
    all-digit part, e.g. ``blocks.3`` or ``layer2.1``) form one point; a tensor outside
    any numbered block is a point of its own, named by its module. Points are in state-dict
    order (the order modules were registered, normally the forward order); the last one is
    the head.
    """
    groups: dict[str, list[str]] = {}
    for key, tensor in state_dict.items():
        if not key.endswith("weight") or tensor.dim() < 2:
            continue
        parts = key.split(".")
        digit = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
        name = ".".join(parts[: digit + 1]) if digit is not None else ".".join(parts[:-1]) or key
        groups.setdefault(name, []).append(key)
    result = [LayerGroup(name, tuple(keys)) for name, keys in groups.items()]
    if result:
        result[-1] = LayerGroup(result[-1].name, result[-1].keys, is_head=True)
    return result


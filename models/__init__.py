"""Model registry: ``build_model(arch, num_classes)``, layer maps and architecture inference.

torchvision's classes are used for the ImageNet-sized networks, so checkpoints saved from
torchvision models load as they are. Nothing here downloads weights.
"""
from __future__ import annotations

import re

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Mapping

import torch
import torchvision
from torch import nn

from .cifar_resnet import CifarResNet
from .layer_maps import LAYER_MAPS, LayerGroup, generic_layer_groups

__all__ = [
    "ARCHITECTURES",
    "GENERIC",
    "LayerGroup",
    "build_model",
    "check_architecture",
    "fresh_head",
    "infer_arch",
    "layer_groups",
    "num_classes_of",
]

GENERIC = "generic"


@dataclass(frozen=True)
class Architecture:
    family: str  # key of LAYER_MAPS and FINGERPRINTS
    builder: Callable[[int], nn.Module]
    head: str  # module name of the classifier that fine-tuning replaces
    fingerprint: tuple  # what FINGERPRINTS[family] returns for this architecture

def _vit(hidden: int, heads: int, mlp: int) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        return torchvision.models.VisionTransformer(
            image_size=224, patch_size=16, num_layers=12, num_heads=heads,
            hidden_dim=hidden, mlp_dim=mlp, num_classes=num_classes,
        )
    return build


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    return lambda num_classes: getattr(torchvision.models, name)(weights=None, num_classes=num_classes)


def _cifar(depth: int) -> Callable[[int], nn.Module]:
    return lambda num_classes: CifarResNet(depth=depth, num_classes=num_classes)


def _count(pattern: str, keys: Iterable[str]) -> tuple[int, ...]:
    """Blocks per stage: ``pattern``'s groups are (stage, block index) or (block index)."""
    blocks: dict[int, set[str]] = {}
    for key in keys:
        if m := re.match(pattern, key):
            stage, index = (int(m[1]), m[2]) if len(m.groups()) == 2 else (0, m[1])
            blocks.setdefault(stage, set()).add(index)
    return tuple(len(blocks[stage]) for stage in sorted(blocks))


def _shape0(state_dict: Mapping[str, torch.Tensor], key: str) -> int | None:
    return int(state_dict[key].shape[0]) if key in state_dict else None


# A cheap summary of a state dict per family (block counts and widths), used to pick the
# one candidate architecture that is then checked tensor by tensor (check_architecture).
FINGERPRINTS: dict[str, Callable[[Mapping[str, torch.Tensor]], tuple]] = {
    "resnet": lambda sd: (
        _count(r"^layer(\d+)\.(\d+)\.", sd), "layer1.0.conv3.weight" in sd, _shape0(sd, "conv1.weight")
    ),
    "densenet": lambda sd: (
        _count(r"^features\.denseblock(\d+)\.denselayer(\d+)\.", sd), _shape0(sd, "features.conv0.weight")
    ),
    "vit": lambda sd: (
        _count(r"^encoder\.layers\.encoder_layer_(\d+)\.", sd), _shape0(sd, "conv_proj.weight")
    ),
}

_TV_RESNETS = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True),
               101: ((3, 4, 23, 3), True), 152: ((3, 8, 36, 3), True)}
_TV_DENSENETS = {121: ((6, 12, 24, 16), 64), 161: ((6, 12, 36, 24), 96),
                 169: ((6, 12, 32, 32), 64), 201: ((6, 12, 48, 32), 64)}

ARCHITECTURES: dict[str, Architecture] = {
    **{f"resnet{d}": Architecture("resnet", _torchvision(f"resnet{d}"), "fc", (blocks, bottleneck, 64))
       for d, (blocks, bottleneck) in _TV_RESNETS.items()},
    **{f"resnet{d}": Architecture("resnet", _cifar(d), "fc", (((d - 2) // 6,) * 3, False, 16))
       for d in (20, 32, 44, 56, 110)},
    **{f"densenet{d}": Architecture("densenet", _torchvision(f"densenet{d}"), "classifier", config)
       for d, config in _TV_DENSENETS.items()},
    "vit_s16": Architecture("vit", _vit(hidden=384, heads=6, mlp=1536), "heads.head", ((12,), 384)),
    "vit_b16": Architecture("vit", _vit(hidden=768, heads=12, mlp=3072), "heads.head", ((12,), 768)),
}


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised model; ``arch`` is a key of :data:`ARCHITECTURES`."""
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch].builder(num_classes)


def fresh_head(model: nn.Module, arch: str) -> nn.Linear:
    """Replace ``model``'s classifier with a new ``nn.Linear(in_features, out_features)`` in
    PyTorch's default initialisation, and return it.

    This is what the seed's fine-tuning does (``net.fc = nn.Linear(...)``), and it is done
    the same way for every architecture: torchvision would otherwise start a ViT's head at
    zero and a DenseNet's bias at zero.
    """
    name = ARCHITECTURES[arch].head
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"the head {name} of {arch} is a {type(old).__name__}, not nn.Linear")
    new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return new


def _is_layer_weight(key: str, tensor: torch.Tensor) -> bool:
    return key.endswith("weight") and tensor.dim() >= 2


@lru_cache(maxsize=None)
def _reference_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the architecture's 2+-dim weights outside the head (built on ``meta``:
    no memory, no initialisation cost)."""
    with torch.device("meta"):
        model = build_model(arch, num_classes=10)
    head = ARCHITECTURES[arch].head + "."
    return {
        key: tuple(t.shape)
        for key, t in model.state_dict().items()
        if _is_layer_weight(key, t) and not key.startswith(head)
    }


def check_architecture(arch: str, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """``None`` when ``state_dict`` is a checkpoint of ``arch``, else the first difference."""
    expected = _reference_shapes(arch)
    head = ARCHITECTURES[arch].head + "."
    for key, shape in expected.items():
        if key not in state_dict:
            return f"tensor {key} is missing"
        if tuple(state_dict[key].shape) != shape:
            return f"tensor {key} has shape {list(state_dict[key].shape)}, expected {list(shape)}"
    for key, tensor in state_dict.items():
        if _is_layer_weight(key, tensor) and key not in expected and not key.startswith(head):
            return f"tensor {key} is not part of {arch}"
    return None


def infer_arch(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The registered architecture whose weights match ``state_dict`` exactly, if any."""
    fingerprints = {family: get(state_dict) for family, get in FINGERPRINTS.items()}
    for arch, spec in ARCHITECTURES.items():
        if spec.fingerprint == fingerprints[spec.family] and check_architecture(arch, state_dict) is None:
            return arch
    return None


def layer_groups(arch: str, state_dict: Mapping[str, torch.Tensor]) -> list[LayerGroup]:
    """The ordered points of ``arch`` for a checkpoint (only its keys and shapes are read)."""
    if arch == GENERIC:
        return generic_layer_groups(state_dict)
    return LAYER_MAPS[ARCHITECTURES[arch].family](list(state_dict))


def num_classes_of(arch: str, state_dict: Mapping[str, torch.Tensor]) -> int:
    """Number of classes of a checkpoint's head (its weight's first dimension)."""
    return int(state_dict[ARCHITECTURES[arch].head + ".weight"].shape[0])

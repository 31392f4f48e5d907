"""Model registry: ``build_model(arch, num_classes)``, layer maps and architecture inference.

Every architecture is registered once (:func:`register`, see docs/architectures.md): its
builder, head, :class:`Family` (fingerprint function and layer map) and the fingerprint
value its state dicts have. torchvision's classes are used for the ImageNet-sized
networks, so checkpoints saved from torchvision models load as they are. Nothing here
downloads weights.
"""
from __future__ import annotations

import re

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from utils import UserError

from .cifar_densenet import CifarDenseNet
from .cifar_resnet import CifarResNet
from .layer_maps import (LayerGroup, densenet_layer_groups, generic_layer_groups, resnet_layer_groups,
                         vit_layer_groups)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "DENSENET",
    "Family",
    "GENERIC",
    "LayerGroup",
    "RESNET",
    "VIT",
    "build_model",
    "check_architecture",
    "fresh_head",
    "fresh_initialisation",
    "infer_arch",
    "layer_groups",
    "num_classes_of",
    "register",
    "resolve_arch",
]

GENERIC = "generic"  # not an architecture: the layer grouping for any model (generic_layer_groups)


@dataclass(frozen=True)
class Family:
    """Architectures that share their state-dict names (and so one layer map)."""

    name: str
    # A cheap summary of a state dict (block counts, widths): picks the one candidate
    # architecture that check_architecture then compares tensor by tensor.
    fingerprint: Callable[[Mapping[str, torch.Tensor]], tuple]
    # The state dict's keys -> the ordered points of the T curve (models/layer_maps.py).
    layer_map: Callable[[Sequence[str]], list[LayerGroup]]


@dataclass(frozen=True)
class Architecture:
    """Everything one architecture needs; :func:`register` adds it to :data:`ARCHITECTURES`."""

    name: str
    family: Family
    builder: Callable[[int], nn.Module]  # num_classes -> a freshly initialised model
    head: str  # module name of the classifier that fine-tuning replaces
    fingerprint: tuple  # what family.fingerprint returns for this architecture's state dicts
    input_size: int | None = None  # the image size the model is built for; None: any size


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Make ``arch`` known to every script (``--arch`` choices, inference, layer maps)."""
    if arch.name in ARCHITECTURES or arch.name == GENERIC:
        raise ValueError(f"architecture {arch.name!r} is already registered")
    ARCHITECTURES[arch.name] = arch
    return arch


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


def _resnet_fingerprint(sd: Mapping[str, torch.Tensor]) -> tuple:
    """(blocks per stage, bottleneck blocks?, stem width)"""
    return _count(r"^layer(\d+)\.(\d+)\.", sd), "layer1.0.conv3.weight" in sd, _shape0(sd, "conv1.weight")


def _densenet_fingerprint(sd: Mapping[str, torch.Tensor]) -> tuple:
    """(dense layers per block, stem width)"""
    return _count(r"^features\.denseblock(\d+)\.denselayer(\d+)\.", sd), _shape0(sd, "features.conv0.weight")


def _vit_fingerprint(sd: Mapping[str, torch.Tensor]) -> tuple:
    """((encoder blocks,), hidden width)"""
    return _count(r"^encoder\.layers\.encoder_layer_(\d+)\.", sd), _shape0(sd, "conv_proj.weight")


RESNET = Family("resnet", _resnet_fingerprint, resnet_layer_groups)
DENSENET = Family("densenet", _densenet_fingerprint, densenet_layer_groups)
VIT = Family("vit", _vit_fingerprint, vit_layer_groups)


def _vit(hidden: int, heads: int, mlp: int, image_size: int = 224, patch_size: int = 16) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision  # here, not at the top: importing it takes seconds, and measuring needs none of it

        return torchvision.models.VisionTransformer(
            image_size=image_size, patch_size=patch_size, num_layers=12, num_heads=heads,
            hidden_dim=hidden, mlp_dim=mlp, num_classes=num_classes,
        )
    return build


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision  # imported when a model is built (see _vit)

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    return build


def _cifar(depth: int, bottleneck: bool = False) -> Callable[[int], nn.Module]:
    return lambda num_classes: CifarResNet(depth=depth, num_classes=num_classes, bottleneck=bottleneck)


_TV_RESNETS = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True),
               101: ((3, 4, 23, 3), True), 152: ((3, 8, 36, 3), True)}
_TV_DENSENETS = {121: ((6, 12, 24, 16), 64), 161: ((6, 12, 36, 24), 96),
                 169: ((6, 12, 32, 32), 64), 201: ((6, 12, 48, 32), 64)}


def _register_builtin() -> None:
    for depth, (blocks, bottleneck) in _TV_RESNETS.items():
        register(Architecture(f"resnet{depth}", RESNET, _torchvision(f"resnet{depth}"), head="fc",
                              fingerprint=(blocks, bottleneck, 64)))
    for depth in (20, 32, 44, 56, 110):
        register(Architecture(f"resnet{depth}", RESNET, _cifar(depth), head="fc",
                              fingerprint=(((depth - 2) // 6,) * 3, False, 16)))
    for depth, config in _TV_DENSENETS.items():
        register(Architecture(f"densenet{depth}", DENSENET, _torchvision(f"densenet{depth}"),
                              head="classifier", fingerprint=config))
    # CPU-scale members of the paper's other families (docs/architectures.md): ResNet-50's
    # bottleneck blocks, DenseNet-121's dense blocks and transitions, ViT-small's 12 blocks
    register(Architecture("resnet29_bottleneck", RESNET, _cifar(29, bottleneck=True), head="fc",
                          fingerprint=((3, 3, 3), True, 16)))
    register(Architecture("densenet63", DENSENET, lambda num_classes: CifarDenseNet(num_classes=num_classes),
                          head="classifier", fingerprint=((3, 6, 12, 8), 24)))
    register(Architecture("vit_w96_p4", VIT, _vit(hidden=96, heads=3, mlp=384, image_size=32, patch_size=4),
                          head="heads.head", fingerprint=((12,), 96), input_size=32))
    register(Architecture("vit_s16", VIT, _vit(hidden=384, heads=6, mlp=1536), head="heads.head",
                          fingerprint=((12,), 384), input_size=224))
    register(Architecture("vit_b16", VIT, _vit(hidden=768, heads=12, mlp=3072), head="heads.head",
                          fingerprint=((12,), 768), input_size=224))


_register_builtin()


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised model; ``arch`` is a key of :data:`ARCHITECTURES`."""
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch].builder(num_classes)


def fresh_initialisation(arch: str, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """The state dict of ``build_model(arch, num_classes)`` built right after seeding torch's
    CPU generator with ``seed``: what pre-training saves as theta_r when it starts from that
    seed (``engine.runs``: ``seed_everything(seed)``, then ``build_model``), so the same seed
    gives the same tensors, bit for bit.

    The caller's random state is left as it was: torch's CPU generator is saved and restored,
    and no other generator (CUDA's, numpy's, Python's) is touched.
    """
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    state = torch.get_rng_state()
    try:
        torch.default_generator.manual_seed(seed)  # torch.manual_seed would also seed every CUDA device
        with torch.device("cpu"):
            return build_model(arch, num_classes).state_dict()
    finally:
        torch.set_rng_state(state)


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


class _NoInitialisation(TorchFunctionMode):
    """Skips every in-place operation on a ``meta`` tensor (the initialisers' ``normal_``,
    ``uniform_``, ``zero_``...): a model built for its shapes needs no values, and torch runs
    those operations on ``meta`` through its Python reference implementations, whose import
    (torch._dynamo) takes seconds."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor) \
                and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


@lru_cache(maxsize=None)
def _reference_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the architecture's 2+-dim weights outside the head (built on ``meta``:
    no memory, no initialisation cost)."""
    with torch.device("meta"), _NoInitialisation():
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
    fingerprints: dict[str, tuple] = {}  # per family, computed once
    for arch, spec in ARCHITECTURES.items():
        family = spec.family
        if family.name not in fingerprints:
            fingerprints[family.name] = family.fingerprint(state_dict)
        if spec.fingerprint == fingerprints[family.name] and check_architecture(arch, state_dict) is None:
            return arch
    return None


def resolve_arch(state_dict: Mapping[str, torch.Tensor], requested: str | None, source: str,
                 flag: str | None = "--arch", allow_generic: bool = False, reference: str | None = None) -> str:
    """The architecture of the checkpoint ``state_dict``: inferred from its tensors when
    ``requested`` is None, else ``requested`` once checked against them.

    ``source`` names the checkpoint (a path, ``-a PATH``) and ``flag`` what names the
    architecture (``--arch``, or a parameter's name; None where the command has no such flag);
    both are in the messages.
    ``allow_generic`` accepts :data:`GENERIC` (returned as it is, nothing checked) and
    suggests it when nothing matches. With ``reference`` (the file ``requested`` was found
    in) only a checkpoint recognisably of another architecture is refused: other
    differences are left to the caller, which compares the tensors themselves.
    Raises :class:`utils.UserError` with a one-line message saying what to do.
    """
    if requested is None:
        arch = infer_arch(state_dict)
        if arch is None and flag is None:  # a command with no flag to name it
            raise UserError(f"{source}: cannot infer the architecture from its tensors; this command reads "
                            f"checkpoints of {', '.join(ARCHITECTURES)} only")
        if arch is None:
            generic = f", or {flag} {GENERIC} to group the weights of any model by block (docs/metric.md)"
            raise UserError(f"{source}: cannot infer the architecture from its tensors; pass {flag} NAME "
                            f"(one of {', '.join(ARCHITECTURES)}){generic if allow_generic else ''}")
        return arch
    if allow_generic and requested == GENERIC:
        return GENERIC
    if requested not in ARCHITECTURES:
        raise UserError(f"{flag} {requested}: unknown architecture; choose one of {', '.join(ARCHITECTURES)}")
    problem = check_architecture(requested, state_dict)
    if problem is None:
        return requested
    found = infer_arch(state_dict)
    if reference is not None:
        if found is None:
            return requested
        raise UserError(f"{source}: is a {found} checkpoint but {reference} is {requested}; "
                        "the checkpoints must all be of the same architecture")
    seen = f"it is a {found} checkpoint" if found else problem
    raise UserError(f"{flag} {requested} does not match {source}: {seen}; fix {flag} or the checkpoint")


def layer_groups(arch: str, state_dict: Mapping[str, torch.Tensor]) -> list[LayerGroup]:
    """The ordered points of ``arch`` for a checkpoint (only its keys and shapes are read)."""
    if arch == GENERIC:
        return generic_layer_groups(state_dict)
    return ARCHITECTURES[arch].family.layer_map(list(state_dict))


def num_classes_of(arch: str, state_dict: Mapping[str, torch.Tensor]) -> int:
    """Number of classes of a checkpoint's head (its weight's first dimension)."""
    return int(state_dict[ARCHITECTURES[arch].head + ".weight"].shape[0])

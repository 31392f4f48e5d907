"""Layer maps: every weight they should hold, once, in forward order; architecture inference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models import ARCHITECTURES, GENERIC, build_model, check_architecture, infer_arch, layer_groups
from models.layer_maps import generic_layer_groups

# Points per architecture: stem + blocks + head for ResNets, DenseNet-121 as in the paper,
# one per encoder block for ViT.
EXPECTED_POINTS = {
    "resnet18": 1 + 8 + 1, "resnet34": 1 + 16 + 1, "resnet50": 1 + 16 + 1, "resnet101": 1 + 33 + 1,
    "resnet152": 1 + 50 + 1, "resnet20": 1 + 9 + 1, "resnet32": 1 + 15 + 1, "resnet44": 1 + 21 + 1,
    "resnet56": 1 + 27 + 1, "resnet110": 1 + 54 + 1,
    "densenet121": 1 + 58 + 3 + 1, "densenet161": 1 + 78 + 3 + 1, "densenet169": 1 + 82 + 3 + 1,
    "densenet201": 1 + 98 + 3 + 1,
    "vit_s16": 12, "vit_b16": 12,
    "resnet29_bottleneck": 1 + 9 + 1, "densenet63": 1 + 29 + 3 + 1, "vit_w96_p4": 12,
}


def meta_model(arch: str) -> nn.Module:
    with torch.device("meta"):
        return build_model(arch, num_classes=7)


def forward_call_order(model: nn.Module, arch: str) -> dict[str, int]:
    """Module name -> index of its first call in a forward pass (on the meta device)."""
    order: dict[str, int] = {}

    def record(name: str):
        def hook(module, args):
            order.setdefault(name, len(order))  # returns None: the inputs stay as they are
        return hook

    for name, module in model.named_modules():
        module.register_forward_pre_hook(record(name))
    size = ARCHITECTURES[arch].input_size or 224  # None: any size does
    with torch.device("meta"):
        model(torch.empty(1, 3, size, size))
    return order


def expected_weights(model: nn.Module, arch: str) -> tuple[set[str], str | None]:
    """The weights each rule of docs/architectures.md names, found from the modules, and the head."""
    family = ARCHITECTURES[arch].family.name
    expected: set[str] = set()
    for name, module in model.named_modules():
        if family == "resnet" and isinstance(module, nn.Conv2d) and "downsample" not in name:
            expected.add(f"{name}.weight")
        elif family == "densenet" and isinstance(module, nn.Conv2d):
            expected.add(f"{name}.weight")
        elif family == "vit" and isinstance(module, nn.MultiheadAttention):
            expected |= {f"{name}.in_proj_weight", f"{name}.out_proj.weight"}
        elif family == "vit" and isinstance(module, nn.Linear) and ".mlp." in name:
            expected.add(f"{name}.weight")
    head = {"resnet": "fc.weight", "densenet": "classifier.weight", "vit": None}[family]
    if head:
        expected.add(head)
    return expected, head


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_layer_map_covers_each_weight_once_in_forward_order(arch):
    model = meta_model(arch)
    state_dict = model.state_dict()
    groups = layer_groups(arch, state_dict)
    assert len(groups) == EXPECTED_POINTS[arch]

    keys = [key for group in groups for key in group.keys]
    expected, head = expected_weights(model, arch)
    assert len(keys) == len(set(keys)), "a weight is counted twice"
    assert set(keys) == expected

    heads = [group for group in groups if group.is_head]
    if head is None:
        assert heads == []
    else:
        assert heads == [groups[-1]] and groups[-1].keys == (head,)

    order = forward_call_order(model, arch)

    def call_index(key: str) -> int:
        module = key.rsplit(".", 1)[0]
        while module not in order:  # out_proj is used by its parent attention module
            module = module.rsplit(".", 1)[0]
        return order[module]

    indices = [call_index(key) for key in keys]
    assert indices == sorted(indices), f"{arch}: layer map is not in forward order"


@pytest.mark.parametrize("arch", ["resnet50", "densenet121", "vit_s16"])
def test_paper_point_counts(arch):
    assert len(layer_groups(arch, meta_model(arch).state_dict())) == {"resnet50": 18, "densenet121": 63, "vit_s16": 12}[arch]


def test_resnet50_point_names_and_tensors():
    groups = layer_groups("resnet50", meta_model("resnet50").state_dict())
    assert [g.name for g in groups[:3]] == ["conv1", "layer1.0", "layer1.1"]
    assert groups[1].keys == ("layer1.0.conv1.weight", "layer1.0.conv2.weight", "layer1.0.conv3.weight")
    assert groups[-2].name == "layer4.2" and groups[-1].name == "fc"


def test_vit_block_holds_attention_and_mlp_in_order():
    groups = layer_groups("vit_s16", meta_model("vit_s16").state_dict())
    prefix = "encoder.layers.encoder_layer_3."
    assert groups[3].keys == (
        prefix + "self_attention.in_proj_weight", prefix + "self_attention.out_proj.weight",
        prefix + "mlp.0.weight", prefix + "mlp.3.weight",
    )
    assert groups[10].name == "encoder.layers.encoder_layer_10"  # numeric, not lexical, order


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_infer_arch_recognises_every_registered_architecture(arch):
    state_dict = meta_model(arch).state_dict()
    assert infer_arch(state_dict) == arch
    assert check_architecture(arch, state_dict) is None


def test_infer_arch_ignores_the_head_shape():
    with torch.device("meta"):
        state_dict = build_model("resnet50", num_classes=3).state_dict()
    assert infer_arch(state_dict) == "resnet50"


def test_infer_arch_rejects_near_misses():
    import torchvision

    with torch.device("meta"):
        wide = torchvision.models.wide_resnet50_2().state_dict()  # resnet50's blocks, other widths
    assert infer_arch(wide) is None
    assert "layer1.0.conv1.weight" in check_architecture("resnet50", wide)
    state_dict = meta_model("resnet34").state_dict()
    del state_dict["layer3.5.conv2.weight"]
    assert infer_arch(state_dict) is None
    assert check_architecture("resnet34", state_dict) == "tensor layer3.5.conv2.weight is missing"


class TinyTransformer(nn.Module):
    """A model no layer map knows (timm-like names) for the generic grouping."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Sequential()
        self.patch_embed.add_module("proj", nn.Conv2d(3, 8, 4, 4))
        self.blocks = nn.Sequential(*[
            nn.ModuleDict({"norm": nn.LayerNorm(8), "qkv": nn.Linear(8, 24), "fc": nn.Linear(8, 8)})
            for _ in range(3)
        ])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)


def test_generic_grouping_by_numbered_block():
    state_dict = TinyTransformer().state_dict()
    groups = generic_layer_groups(state_dict)
    assert [(g.name, g.is_head) for g in groups] == [
        ("patch_embed.proj", False), ("blocks.0", False), ("blocks.1", False), ("blocks.2", False), ("head", True),
    ]
    assert groups[2].keys == ("blocks.1.qkv.weight", "blocks.1.fc.weight")
    assert infer_arch(state_dict) is None
    assert layer_groups(GENERIC, state_dict) == groups


@pytest.mark.parametrize("arch", ["resnet20", "densenet121", "vit_s16"])
def test_fine_tuning_head_is_a_fresh_default_linear(arch):
    """Every architecture gets the seed's new head: nn.Linear in PyTorch's default
    initialisation (uniform in +-1/sqrt(fan_in) for weight and bias), not torchvision's
    zero-initialised ViT head or DenseNet's zero bias."""
    from torch import nn

    from models import ARCHITECTURES, build_model, fresh_head

    model = build_model(arch, num_classes=7)
    torch.manual_seed(0)
    head = fresh_head(model, arch)
    assert model.get_submodule(ARCHITECTURES[arch].head) is head and type(head) is nn.Linear
    assert head.out_features == 7
    bound = 1 / head.in_features ** 0.5
    for tensor in (head.weight, head.bias):
        assert tensor.abs().max() <= bound and tensor.abs().mean() > bound / 4  # uniform, not zero
    torch.manual_seed(0)
    reference = nn.Linear(head.in_features, 7)
    assert torch.equal(head.weight, reference.weight) and torch.equal(head.bias, reference.bias)

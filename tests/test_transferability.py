"""The transferability metric against answers known by construction and an independent computation."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from metrics import (
    FROZEN,
    HEAD,
    FrozenLayerWarning,
    NonFiniteTensorError,
    TransferabilityMeter,
    abs_diff_sums,
    layerwise_transferability,
    overall_transferability,
)
from models import build_model, layer_groups
from models.layer_maps import LayerGroup

# The seed's printed ResNet-50 / CIFAR-10 curve; the paper's table gives 7.79 for it.
SEED_CURVE = [3.44, 7.76, 8.59, 7.3, 5.42, 9.2, 6.1, 5.52, 4.23, 7.65, 8.3, 8.32, 8.86, 8.88, 5.96, 13.0, 13.81, 1.0]


def seeded_state_dict(arch: str, seed: int, num_classes: int = 10) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model(arch, num_classes).state_dict()


def perturbed(state_dict, scale: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
        for k, v in state_dict.items()
    }


def reference_transferability(groups, theta_r, theta_a, theta_b) -> list[float]:
    """A straightforward float64 computation, written independently of metrics/."""
    values = []
    for group in groups:
        if group.is_head:
            values.append(1.0)
            continue
        d_r = sum((theta_r[k].double() - theta_b[k].double()).abs().mean().item() for k in group.keys)
        d_a = sum((theta_a[k].double() - theta_b[k].double()).abs().mean().item() for k in group.keys)
        values.append(d_r / d_a)  # the 1/len(keys) factors cancel
    return values


def test_seed_curve_gives_the_papers_overall_value():
    """The table's 7.79 is the mean of the 17 non-head points. The published points are
    rounded to 2 decimals, so the mean of the unrounded values lies within 0.005 of the
    mean of the printed ones (132.34 / 17 = 7.7847); a table value of 7.79 means a mean in
    [7.785, 7.795). The two intervals overlap; other averagings are far off."""
    is_head = [False] * 17 + [True]
    overall = overall_transferability(SEED_CURVE, is_head)
    assert overall == pytest.approx(132.34 / 17, rel=1e-12)
    assert overall - 0.005 < 7.795 and overall + 0.005 >= 7.785
    assert abs(sum(SEED_CURVE) / 18 - 7.79) > 0.3  # the head included: 7.41
    assert abs(sum(SEED_CURVE[1:17]) / 16 - 7.79) > 0.2  # the stem left out too: 8.06


@pytest.mark.parametrize("k", [0.5, 3.0, 12.0])
def test_known_answer_every_point_equals_k(k):
    theta_a = seeded_state_dict("resnet20", 0)
    theta_b = perturbed(theta_a, 0.01, seed=1)  # B = A + delta
    # r - B = k * delta exactly in float64, so D(r, B) = k * D(A, B) at every point
    theta_a = {key: v.double() if v.is_floating_point() else v for key, v in theta_a.items()}
    theta_b = {key: v.double() if v.is_floating_point() else v for key, v in theta_b.items()}
    theta_r = {key: theta_b[key] + k * (theta_b[key] - theta_a[key]) if v.is_floating_point() else v
               for key, v in theta_a.items()}
    groups = layer_groups("resnet20", theta_a)
    result = layerwise_transferability(groups, theta_r, theta_a, theta_b)
    assert len(result.layers) == 11
    for layer in result.layers[:-1]:
        assert layer.transferability == pytest.approx(k, rel=1e-9)
    assert result.layers[-1].transferability == 1.0 and result.layers[-1].status == HEAD
    assert result.overall == pytest.approx(k, rel=1e-9)


def test_issue_construction_r_equals_a_plus_k_delta():
    """B = A + delta and r = A + k*delta: r - B = (k - 1) * delta, so T = k - 1 (k > 1)."""
    theta_a = {key: v.double() for key, v in seeded_state_dict("resnet20", 0).items() if v.is_floating_point()}
    delta = {key: 0.01 * torch.randn_like(v) for key, v in theta_a.items()}
    k = 5.0
    theta_b = {key: theta_a[key] + delta[key] for key in theta_a}
    theta_r = {key: theta_a[key] + k * delta[key] for key in theta_a}
    result = layerwise_transferability(layer_groups("resnet20", theta_a), theta_r, theta_a, theta_b)
    assert result.overall == pytest.approx(k - 1, rel=1e-9)


def test_per_layer_scaling_gives_per_layer_values():
    theta_a = seeded_state_dict("resnet20", 0)
    theta_b = perturbed(theta_a, 0.02, seed=2)
    groups = layer_groups("resnet20", theta_a)
    theta_r = dict(theta_b)
    factors = [1.5 + i for i in range(len(groups) - 1)]
    for group, factor in zip(groups, factors):
        for key in group.keys:
            theta_r[key] = theta_b[key] + factor * (theta_b[key] - theta_a[key])
    result = layerwise_transferability(groups, theta_r, theta_a, theta_b)
    assert result.values[:-1] == pytest.approx(factors, rel=1e-5)
    assert result.overall == pytest.approx(sum(factors) / len(factors), rel=1e-5)


def test_point_distance_is_the_mean_of_its_tensors_distances():
    """Not the distance pooled over all elements: a 4-element tensor weighs as much as a 400-element one."""
    a = {"x.weight": torch.zeros(2, 2), "y.weight": torch.zeros(20, 20), "h.weight": torch.zeros(3, 2)}
    b = {"x.weight": torch.full((2, 2), 1.0), "y.weight": torch.full((20, 20), 3.0), "h.weight": torch.ones(3, 2)}
    r = {"x.weight": torch.full((2, 2), 5.0), "y.weight": torch.full((20, 20), 4.0), "h.weight": torch.ones(3, 2)}
    groups = [LayerGroup("block", ("x.weight", "y.weight")), LayerGroup("h", ("h.weight",), is_head=True)]
    layer = layerwise_transferability(groups, r, a, b).layers[0]
    assert layer.d_random == pytest.approx((4.0 + 1.0) / 2)
    assert layer.d_pretrained == pytest.approx((1.0 + 3.0) / 2)
    assert layer.transferability == pytest.approx(2.5 / 2.0)


@pytest.mark.parametrize("arch", ["resnet50", "densenet121", "vit_s16"])
def test_agrees_with_independent_computation_on_random_trios(arch):
    theta_r = seeded_state_dict(arch, 0)
    theta_a = perturbed(theta_r, 0.05, seed=1)
    theta_b = perturbed(theta_a, 0.01, seed=2)
    groups = layer_groups(arch, theta_a)
    result = layerwise_transferability(groups, theta_r, theta_a, theta_b)
    expected = reference_transferability(groups, theta_r, theta_a, theta_b)
    assert result.values == pytest.approx(expected, rel=1e-6)
    assert result.overall == pytest.approx(
        sum(v for g, v in zip(groups, expected) if not g.is_head) / sum(not g.is_head for g in groups), rel=1e-6
    )


def test_frozen_layer_is_infinite_warned_and_left_out_of_the_mean():
    theta_r = seeded_state_dict("resnet20", 0)
    theta_a = perturbed(theta_r, 0.05, seed=1)
    theta_b = perturbed(theta_a, 0.01, seed=2)
    groups = layer_groups("resnet20", theta_a)
    frozen = groups[2]
    for key in frozen.keys:
        theta_b[key] = theta_a[key].clone()
    with pytest.warns(FrozenLayerWarning, match=frozen.name):
        result = layerwise_transferability(groups, theta_r, theta_a, theta_b)
    assert result.layers[2].status == FROZEN and result.layers[2].transferability == math.inf
    finite = [v for i, v in enumerate(result.values[:-1]) if i != 2]
    assert result.overall == pytest.approx(sum(finite) / len(finite), rel=1e-12)


def test_no_warning_without_frozen_layers():
    theta_r = seeded_state_dict("resnet20", 0)
    theta_a = perturbed(theta_r, 0.05, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layerwise_transferability(layer_groups("resnet20", theta_a), theta_r, theta_a, perturbed(theta_a, 0.01, 2))


@pytest.mark.parametrize("role", ["random", "pretrained", "finetuned"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_tensor_is_named(role, bad):
    theta_r = seeded_state_dict("resnet20", 0)
    theta_a = perturbed(theta_r, 0.05, seed=1)
    theta_b = perturbed(theta_a, 0.01, seed=2)
    target = {"random": theta_r, "pretrained": theta_a, "finetuned": theta_b}[role]
    target["layer2.1.conv2.weight"].view(-1)[7] = bad
    with pytest.raises(NonFiniteTensorError) as info:
        layerwise_transferability(layer_groups("resnet20", theta_a), theta_r, theta_a, theta_b)
    assert (info.value.key, info.value.role) == ("layer2.1.conv2.weight", role)


def test_head_tensors_are_never_read():
    """The head may hold anything (other class count, even NaN): it is 1.0 by definition."""
    theta_r = seeded_state_dict("resnet20", 0, num_classes=1000)
    theta_a = perturbed(theta_r, 0.05, seed=1)
    theta_b = perturbed(seeded_state_dict("resnet20", 3, num_classes=7), 0.0, seed=0)
    theta_b["fc.weight"][0, 0] = math.nan
    result = layerwise_transferability(layer_groups("resnet20", theta_a), theta_r, theta_a, theta_b)
    assert result.layers[-1].transferability == 1.0 and result.layers[-1].d_random is None


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 1 << 20])
def test_chunked_sums_match_a_direct_sum(chunk):
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(10, 33, generator=generator)
    refs = [torch.randn(10, 33, generator=generator), torch.randn(10, 33, generator=generator)]
    sums = abs_diff_sums(target, refs, chunk)
    assert sums.dtype == torch.float64
    for value, ref in zip(sums.tolist(), refs):
        assert value == pytest.approx((ref.double() - target.double()).abs().sum().item(), rel=1e-6)


def test_half_precision_inputs_are_widened():
    generator = torch.Generator().manual_seed(0)
    target = (torch.randn(5000, generator=generator) * 100).half()
    ref = (torch.randn(5000, generator=generator) * 100).half()
    exact = (ref.double() - target.double()).abs().sum().item()
    assert abs_diff_sums(target, [ref], 512).item() == pytest.approx(exact, rel=1e-7)


def test_float32_overflow_is_recomputed_in_float64():
    groups = [LayerGroup("w", ("w.weight",))]
    big = 3e38
    theta_a = {"w.weight": torch.full((2, 2), -big)}
    theta_b = {"w.weight": torch.full((2, 2), big)}
    theta_r = {"w.weight": torch.full((2, 2), 0.0)}
    layer = layerwise_transferability(groups, theta_r, theta_a, theta_b).layers[0]
    assert layer.d_pretrained == pytest.approx(2 * big, rel=1e-6)
    assert layer.transferability == pytest.approx(0.5, rel=1e-6)


def test_meter_reuses_r_and_a_for_many_finetuned_checkpoints():
    theta_r = seeded_state_dict("resnet20", 0)
    theta_a = perturbed(theta_r, 0.05, seed=1)
    groups = layer_groups("resnet20", theta_a)
    meter = TransferabilityMeter(groups, theta_r, theta_a)
    for seed in (2, 3):
        theta_b = perturbed(theta_a, 0.01 * seed, seed=seed)
        assert meter(theta_b) == layerwise_transferability(groups, theta_r, theta_a, theta_b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_and_cpu_agree():
    theta_r = seeded_state_dict("resnet50", 0)
    theta_a = perturbed(theta_r, 0.05, seed=1)
    theta_b = perturbed(theta_a, 0.01, seed=2)
    groups = layer_groups("resnet50", theta_a)
    cpu = layerwise_transferability(groups, theta_r, theta_a, theta_b, device="cpu")
    gpu = layerwise_transferability(groups, theta_r, theta_a, theta_b, device="cuda")
    assert gpu.values == pytest.approx(cpu.values, rel=1e-6)
    for c, g in zip(cpu.layers, gpu.layers):
        if c.d_random is not None:
            assert g.d_random == pytest.approx(c.d_random, rel=1e-6)
            assert g.d_pretrained == pytest.approx(c.d_pretrained, rel=1e-6)


# ------------------------------------------------------------------ pretraining diagnostics


def test_how_far_pretraining_moved_each_point():
    """d_init = D(theta_r, theta_A) and cos_init = the cosine of theta_r and theta_A, per point
    (the mean over its tensors), by hand: theta_A = -theta_r, 2 theta_r and an orthogonal tensor."""
    r1, r2 = torch.tensor([[1.0, -2.0], [3.0, 0.5]]), torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
    orthogonal = torch.tensor([[2.0, 1.0], [-0.5, 0.0]])
    orthogonal = orthogonal - (orthogonal * r1).sum() / (r1 * r1).sum() * r1  # Gram-Schmidt against r1
    theta_r = {"a.weight": r1, "b.weight": r2, "c.weight": r1, "head.weight": torch.ones(2, 2)}
    theta_a = {"a.weight": -r1, "b.weight": 2 * r2, "c.weight": orthogonal, "head.weight": torch.zeros(2, 2)}
    theta_b = {k: v + 0.1 for k, v in theta_a.items()}
    groups = [LayerGroup("a", ("a.weight",), False), LayerGroup("bc", ("b.weight", "c.weight"), False),
              LayerGroup("head", ("head.weight",), True)]
    result = layerwise_transferability(groups, theta_r, theta_a, theta_b)
    a, bc, head = result.layers
    assert a.cos_init == pytest.approx(-1.0, abs=1e-12)
    assert a.d_init == pytest.approx((2 * r1).abs().mean().item(), rel=1e-12)
    assert (r1 * orthogonal).sum().item() == pytest.approx(0.0, abs=1e-6)
    assert bc.cos_init == pytest.approx((1.0 + 0.0) / 2, abs=1e-7)
    assert bc.d_init == pytest.approx((r2.abs().mean().item() + (orthogonal - r1).abs().mean().item()) / 2, rel=1e-6)
    assert head.d_init is None and head.cos_init is None
    assert result.median_cos_init == pytest.approx((-1.0 + 0.5) / 2, abs=1e-7)
    # the same numbers whether the first call measures them or they are asked for first
    meter = TransferabilityMeter(groups, theta_r, theta_a)
    assert meter.init == {"a": (a.d_init, a.cos_init), "bc": (bc.d_init, bc.cos_init)}
    zero = TransferabilityMeter(groups[:1], {"a.weight": torch.zeros(2, 2)}, {"a.weight": r1})
    assert math.isnan(zero.init["a"][1])  # no direction to compare with

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
    mean_over_draws,
    overall_transferability,
    sum_of_squares,
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


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 20])
def test_chunked_scaled_sums_match_a_direct_sum(chunk):
    """With scales, the sums of |ref - c * target| follow those of |ref - target|."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(10, 33, generator=generator)
    refs = [torch.randn(10, 33, generator=generator), torch.randn(10, 33, generator=generator)]
    sums = abs_diff_sums(target, refs, chunk, scales=(0.5, 3.0)).tolist()
    assert len(sums) == 4
    for value, ref, c in zip(sums, refs + refs, (1.0, 1.0, 0.5, 3.0)):
        assert value == pytest.approx((ref.double() - c * target.double()).abs().sum().item(), rel=1e-6)


def test_sum_of_squares_is_exact_in_float64_beyond_float32s_range():
    big = torch.full((5, 5), 3e38)
    value = big[0, 0].item()  # 3e38 as float32 holds it
    assert sum_of_squares(big, 7) == pytest.approx(25 * value ** 2, rel=1e-12)
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    assert sum_of_squares(x, 64) == pytest.approx(x.double().pow(2).sum().item(), rel=1e-6)  # float32 chunks


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
    assert gpu.values_scale_free == pytest.approx(cpu.values_scale_free, rel=1e-6)
    for c, g in zip(cpu.layers, gpu.layers):
        if c.d_random is not None:
            assert g.d_random == pytest.approx(c.d_random, rel=1e-6)
            assert g.d_pretrained == pytest.approx(c.d_pretrained, rel=1e-6)
            assert g.shrink == pytest.approx(c.shrink, rel=1e-6)
            assert g.d_random_scale_free == pytest.approx(c.d_random_scale_free, rel=1e-6)


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


# ------------------------------------------------------- shrink, ft_move and the scale-free T


def reference_scale_free(groups, theta_r, theta_a, theta_b) -> list[float]:
    """The scale-free T by its definition, in float64, written independently of metrics/:
    each tensor divided by its own RMS, tensors with an RMS of 0 anywhere left out."""
    def normalised(x):
        x = x.double()
        return x / x.pow(2).mean().sqrt()

    values = []
    for group in groups:
        if group.is_head:
            values.append(1.0)
            continue
        kept = [k for k in group.keys
                if all(theta[k].double().pow(2).mean().item() > 0 for theta in (theta_r, theta_a, theta_b))]
        if not kept:
            values.append(math.nan)
            continue
        d_r = sum((normalised(theta_r[k]) - normalised(theta_b[k])).abs().mean().item() for k in kept)
        d_a = sum((normalised(theta_a[k]) - normalised(theta_b[k])).abs().mean().item() for k in kept)
        values.append(d_r / d_a if d_a else math.inf)
    return values


def random_trio(arch: str = "resnet20"):
    theta_r = seeded_state_dict(arch, 0)
    theta_a = perturbed(theta_r, 0.05, seed=1)
    theta_b = perturbed(theta_a, 0.01, seed=2)
    return theta_r, theta_a, theta_b, layer_groups(arch, theta_a)


def signs(n: int, flipped: int) -> torch.Tensor:
    """+1 everywhere but -1 on the first ``flipped`` elements: an RMS of 1 whatever is flipped."""
    out = torch.ones(n, dtype=torch.float64)
    out[:flipped] = -1.0
    return out


def test_shrink_and_ft_move_by_hand():
    """Each side is the mean over the point's tensors (a 4-element tensor weighs as much as a
    400-element one), as for D: mean|r| = (3 + 4) / 2, mean|A| = (1 + 2) / 2, D(A, FB) = 0.5."""
    r = {"x.weight": torch.full((2, 2), 3.0), "y.weight": torch.full((20, 20), -4.0), "h.weight": torch.ones(3, 2)}
    a = {"x.weight": torch.full((2, 2), 1.0), "y.weight": torch.full((20, 20), -2.0), "h.weight": torch.ones(3, 2)}
    b = {"x.weight": torch.full((2, 2), 1.5), "y.weight": torch.full((20, 20), -2.5), "h.weight": torch.ones(3, 2)}
    groups = [LayerGroup("block", ("x.weight", "y.weight")), LayerGroup("h", ("h.weight",), is_head=True)]
    layer, head = layerwise_transferability(groups, r, a, b).layers
    assert layer.shrink == pytest.approx(3.5 / 1.5, rel=1e-12)
    assert layer.ft_move == pytest.approx(0.5 / 1.5, rel=1e-12)
    pooled = (4 * 3.0 + 400 * 4.0) / (4 * 1.0 + 400 * 2.0)
    assert abs(layer.shrink - pooled) > 0.3  # not the ratio pooled over all elements
    # exactly T = shrink / ft_move * D(theta_r, theta_FB) / mean|theta_r|
    assert layer.transferability == pytest.approx(layer.shrink / layer.ft_move * layer.d_random / 3.5, rel=1e-12)
    assert head.shrink is None and head.ft_move is None


def test_scale_free_t_by_hand_with_sign_flips():
    """x = +-1 (RMS 1). theta_FB = 2 x, theta_A = 0.5 x with 4 of 40 signs flipped, theta_r
    = 3 x with 12 flipped. Normalised, they differ only where flipped, by 2: D_sf(A, FB) = 2 * 4/40,
    D_sf(r, FB) = 2 * 12/40, T_sf = 3. The paper's T sees the scales: D(A, FB) = (36 * 1.5 + 4 * 2.5)/40
    = 1.6, D(r, FB) = (28 * 1 + 12 * 5)/40 = 2.2, T = 1.375."""
    groups = [LayerGroup("w", ("w.weight",)), LayerGroup("h", ("h.weight",), is_head=True)]
    head = {"h.weight": torch.ones(2, 2)}
    theta_b = {"w.weight": 2 * signs(40, 0), **head}
    theta_a = {"w.weight": 0.5 * signs(40, 4), **head}
    theta_r = {"w.weight": 3 * signs(40, 12), **head}
    result = layerwise_transferability(groups, theta_r, theta_a, theta_b)
    layer = result.layers[0]
    assert layer.d_pretrained_scale_free == pytest.approx(0.2, rel=1e-12)
    assert layer.d_random_scale_free == pytest.approx(0.6, rel=1e-12)
    assert layer.transferability_scale_free == pytest.approx(3.0, rel=1e-12)
    assert layer.transferability == pytest.approx(2.2 / 1.6, rel=1e-12)
    assert result.overall_scale_free == pytest.approx(3.0, rel=1e-12)
    assert result.values_scale_free == pytest.approx([3.0, 1.0], rel=1e-12)
    assert result.layers[1].transferability_scale_free == 1.0 and result.layers[1].d_random_scale_free is None


@pytest.mark.parametrize("role", ["r", "a", "b"])
@pytest.mark.parametrize("k", [0.25, 4.0])
def test_scaling_one_checkpoints_tensor_changes_t_but_not_the_scale_free_t(role, k):
    theta_r, theta_a, theta_b, groups = random_trio()
    before = layerwise_transferability(groups, theta_r, theta_a, theta_b)
    scaled = {"r": theta_r, "a": theta_a, "b": theta_b}[role]
    for key in groups[1].keys:  # the whole point layer1.0 (two tensors)
        scaled[key] = k * scaled[key]
    scaled["layer2.0.conv1.weight"] = k * scaled["layer2.0.conv1.weight"]  # one tensor of a point
    after = layerwise_transferability(groups, theta_r, theta_a, theta_b)
    assert after.values_scale_free == pytest.approx(before.values_scale_free, rel=1e-5)
    for i in (1, 4):
        assert abs(after.values[i] / before.values[i] - 1) > 0.01, (role, k, i)
    assert after.values[2] == pytest.approx(before.values[2], rel=1e-12)  # the other points as they were


@pytest.mark.parametrize("rms", [1.0, 0.05])
def test_scale_free_t_equals_t_when_every_tensor_has_the_same_rms(rms):
    """Every tensor of all three checkpoints rescaled to one RMS: the normalisation divides
    both sides of every point's ratio by that RMS, so T_sf == T."""
    theta_r, theta_a, theta_b, groups = random_trio()
    for theta in (theta_r, theta_a, theta_b):
        for key in theta:
            if theta[key].is_floating_point():
                x = theta[key].double()
                theta[key] = rms * x / x.pow(2).mean().sqrt()
    result = layerwise_transferability(groups, theta_r, theta_a, theta_b)
    assert result.values_scale_free == pytest.approx(result.values, rel=1e-9)
    assert result.overall_scale_free == pytest.approx(result.overall, rel=1e-9)
    for layer in result.layers[:-1]:
        assert layer.d_random_scale_free == pytest.approx(layer.d_random / rms, rel=1e-9)


def test_scale_free_t_differs_from_t_when_a_points_tensors_have_different_rms():
    """Same RMS in the three checkpoints per tensor, but not shared by a point's two tensors:
    T_sf weighs both tensors' distances equally, T weighs them by their size."""
    theta_r, theta_a, theta_b, groups = random_trio()
    for theta in (theta_r, theta_a, theta_b):
        for key in theta:
            if theta[key].is_floating_point():
                x = theta[key].double()
                theta[key] = (5.0 if key.endswith("conv2.weight") else 1.0) * x / x.pow(2).mean().sqrt()
    result = layerwise_transferability(groups, theta_r, theta_a, theta_b)
    assert result.values_scale_free[0] == pytest.approx(result.values[0], rel=1e-9)  # the stem: one tensor
    for i in range(1, 10):
        assert abs(result.values_scale_free[i] / result.values[i] - 1) > 1e-4
    assert result.values_scale_free == pytest.approx(reference_scale_free(groups, theta_r, theta_a, theta_b), rel=1e-9)


@pytest.mark.parametrize("arch", ["resnet20", "densenet121"])
def test_scale_free_agrees_with_independent_computation_on_random_trios(arch):
    theta_r, theta_a, theta_b, groups = random_trio(arch)
    result = layerwise_transferability(groups, theta_r, theta_a, theta_b)
    expected = reference_scale_free(groups, theta_r, theta_a, theta_b)
    assert result.values_scale_free == pytest.approx(expected, rel=1e-5)
    body = [v for g, v in zip(groups, expected) if not g.is_head]
    assert result.overall_scale_free == pytest.approx(sum(body) / len(body), rel=1e-5)


@pytest.mark.parametrize("role", ["r", "a", "b"])
def test_tensor_with_zero_rms_is_left_out_of_the_scale_free_t(role):
    """Point "xy" holds x and y; y is all zeros in one checkpoint, so the point's T_sf is x's
    alone (T still uses both). Point "z" has only a zero tensor: no T_sf (NaN, no distances),
    and it is left out of the overall scale-free value."""
    generator = torch.Generator().manual_seed(0)
    tensors = {key: torch.randn(3, 4, 5, 5, generator=generator, dtype=torch.float64) for key in ("x", "y", "z")}
    theta_r = {f"{k}.weight": v for k, v in tensors.items()}
    theta_a = {f"{k}.weight": 0.5 * v + 0.1 * torch.randn(v.shape, generator=generator, dtype=torch.float64)
               for k, v in tensors.items()}
    theta_b = {k: v + 0.02 * torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in theta_a.items()}
    zeroed = {"r": theta_r, "a": theta_a, "b": theta_b}[role]
    zeroed["y.weight"] = torch.zeros_like(zeroed["y.weight"])
    zeroed["z.weight"] = torch.zeros_like(zeroed["z.weight"])
    groups = [LayerGroup("xy", ("x.weight", "y.weight")), LayerGroup("x", ("x.weight",)),
              LayerGroup("z", ("z.weight",))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FrozenLayerWarning)  # zeros in both A and B would be frozen: not here
        result = layerwise_transferability(groups, theta_r, theta_a, theta_b)
    xy, x, z = result.layers
    assert xy.transferability_scale_free == x.transferability_scale_free
    assert xy.d_random_scale_free == x.d_random_scale_free
    assert math.isfinite(z.transferability)  # the paper's T is still measured
    assert math.isnan(z.transferability_scale_free)
    assert z.d_random_scale_free is None and z.d_pretrained_scale_free is None
    assert result.overall_scale_free == pytest.approx(x.transferability_scale_free, rel=1e-12)


def test_fine_tuning_that_only_rescales_a_point_makes_its_scale_free_t_infinite():
    """theta_FB = 2 theta_A on point 3: T is finite (the weights moved), the normalised
    weights did not: T_sf = inf, left out of the mean. Point 5 is frozen: both are inf."""
    theta_r, theta_a, theta_b, groups = random_trio()
    for key in groups[2].keys:
        theta_b[key] = 2 * theta_a[key]
    for key in groups[4].keys:
        theta_b[key] = theta_a[key].clone()
    with pytest.warns(FrozenLayerWarning, match=groups[4].name):
        result = layerwise_transferability(groups, theta_r, theta_a, theta_b)
    rescaled, frozen = result.layers[2], result.layers[4]
    assert math.isfinite(rescaled.transferability) and rescaled.status != FROZEN
    assert rescaled.transferability_scale_free == math.inf and rescaled.d_pretrained_scale_free == 0.0
    assert frozen.transferability == math.inf and frozen.transferability_scale_free == math.inf
    kept = [v for i, v in enumerate(result.values_scale_free[:-1]) if i not in (2, 4)]
    assert result.overall_scale_free == pytest.approx(sum(kept) / len(kept), rel=1e-12)


def test_scale_free_sums_that_overflow_float32_are_recomputed_in_float64():
    """theta_r = theta_FB = 3e38, theta_A = -3e38 (all RMS 3e38): a - t overflows in float32.
    Normalised: r = FB = 1, A = -1, so D_sf(r, FB) = 0, D_sf(A, FB) = 2, T_sf = 0."""
    groups = [LayerGroup("w", ("w.weight",))]
    big = 3e38
    theta_r, theta_a, theta_b = ({"w.weight": torch.full((2, 2), v)} for v in (big, -big, big))
    layer = layerwise_transferability(groups, theta_r, theta_a, theta_b).layers[0]
    assert layer.d_pretrained_scale_free == pytest.approx(2.0, rel=1e-6)
    assert layer.d_random_scale_free == 0.0 and layer.transferability_scale_free == 0.0
    assert layer.d_pretrained == pytest.approx(2 * big, rel=1e-6)


def test_rms_ratios_beyond_float32_are_computed_in_float64():
    """theta_r's RMS is 1e30, theta_FB's 1e-30 (float32 tensors): the factor rms_r / rms_FB
    = 1e60 does not fit in float32, so the tensor is compared in float64. T_sf = 12 / 4 as in
    the sign-flip construction."""
    groups = [LayerGroup("w", ("w.weight",))]
    theta_b = {"w.weight": (1e-30 * signs(40, 0)).float()}
    theta_a = {"w.weight": signs(40, 4).float()}
    theta_r = {"w.weight": (1e30 * signs(40, 12)).float()}
    layer = layerwise_transferability(groups, theta_r, theta_a, theta_b).layers[0]
    assert layer.d_pretrained_scale_free == pytest.approx(0.2, rel=1e-6)
    assert layer.transferability_scale_free == pytest.approx(3.0, rel=1e-6)


def test_theta_r_and_theta_a_statistics_are_measured_once_per_meter(monkeypatch):
    """RMS, mean|x|, d_init and cos_init of theta_r and theta_A: one pass per tensor for the
    meter's lifetime, however many fine-tuned checkpoints it measures."""
    import metrics.transferability as module

    theta_r, theta_a, theta_b, groups = random_trio()
    calls = []
    original = module._pair_stats
    monkeypatch.setattr(module, "_pair_stats", lambda r, a, chunk: calls.append(1) or original(r, a, chunk))
    meter = TransferabilityMeter(groups, theta_r, theta_a)
    first = meter(theta_b)
    meter(perturbed(theta_a, 0.02, seed=5))
    assert meter.init == {layer.name: (layer.d_init, layer.cos_init) for layer in first.layers[:-1]}
    assert len(calls) == len(meter.keys)


# --------------------------------------------------------------- several draws of theta_r


def test_mean_and_sd_over_draws_by_hand():
    """theta_r_k = B + k (B - A) gives T = k at every point; draws k = 2, 3, 7: mean 4,
    sample sd sqrt(((2-4)^2 + (3-4)^2 + (7-4)^2) / 2) = sqrt(7)."""
    theta_a = {k: v.double() for k, v in seeded_state_dict("resnet20", 0).items() if v.is_floating_point()}
    theta_b = {k: v + 0.01 * torch.randn_like(v) for k, v in theta_a.items()}
    groups = layer_groups("resnet20", theta_a)
    results = [layerwise_transferability(groups, {key: theta_b[key] + k * (theta_b[key] - theta_a[key])
                                                  for key in theta_a}, theta_a, theta_b) for k in (2.0, 3.0, 7.0)]
    summary = mean_over_draws(results)
    assert summary.draws == 3
    assert summary.mean.values[:-1] == pytest.approx([4.0] * 10, rel=1e-9)
    assert summary.sd[:-1] == pytest.approx([math.sqrt(7)] * 10, rel=1e-9)
    assert summary.mean.values[-1] == 1.0 and summary.sd[-1] == 0.0  # the head
    assert summary.mean.overall == pytest.approx(4.0, rel=1e-9)
    assert summary.overall_sd == pytest.approx(math.sqrt(7), rel=1e-9)
    # every other number is the mean over the draws too
    stem = [r.layers[0] for r in results]
    assert summary.mean.layers[0].d_random == pytest.approx(sum(x.d_random for x in stem) / 3, rel=1e-12)
    assert summary.mean.layers[0].shrink == pytest.approx(sum(x.shrink for x in stem) / 3, rel=1e-12)
    assert summary.mean.overall_scale_free == pytest.approx(sum(r.overall_scale_free for r in results) / 3,
                                                            rel=1e-12)
    single = mean_over_draws(results[:1])
    assert single.mean == results[0] and math.isnan(single.overall_sd) and all(math.isnan(s) for s in single.sd)


@pytest.mark.parametrize("scale_r, scale_a", [(1e-25, 1.0), (1.0, 1e25), (1e-40, 1e-3)])
def test_pair_statistics_of_float32_weights_far_from_one_match_float64(scale_r, scale_a):
    """The diagnostics are summed per chunk in float32; squares that would underflow or
    overflow there (RMS 1e-25, 1e25, subnormal 1e-40) are summed again in float64, so the
    cosine, shrink and scale-free T agree with a float64 computation of the same tensors."""
    generator = torch.Generator().manual_seed(3)
    groups = [LayerGroup("w", ("w.weight",))]
    base = torch.randn(300, generator=generator)
    theta_r = {"w.weight": (scale_r * base).float()}
    theta_a = {"w.weight": (scale_a * (base + torch.randn(300, generator=generator))).float()}
    theta_b = {"w.weight": (scale_a * (base + 1.5 * torch.randn(300, generator=generator))).float()}
    narrow = layerwise_transferability(groups, theta_r, theta_a, theta_b).layers[0]
    wide = layerwise_transferability(groups, *({k: v.double() for k, v in t.items()}
                                               for t in (theta_r, theta_a, theta_b))).layers[0]
    for field in ("cos_init", "shrink", "transferability_scale_free", "transferability"):
        assert getattr(narrow, field) == pytest.approx(getattr(wide, field), rel=1e-5), field

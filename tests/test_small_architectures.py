"""The CPU-scale members of the paper's other families (issue 21): the bottleneck CIFAR ResNet
(ResNet-50's blocks), DenseNet-63 (DenseNet-121's dense blocks and transitions) and the
narrow ViT (ViT-small's 12 blocks). Their layer maps, inference and registration are also in
the parametrised tests of test_layer_maps.py and test_models.py; here: the shapes that make
them what they are, T against a hand computation on built checkpoints, training steps, and a
stopped run that resumes bit for bit."""
from __future__ import annotations

import signal

import pytest
import torch
from torch import nn

from engine.checkpoint import load_checkpoint
from engine.processes import ProcessInfo
from engine.settings import TrainSettings
from test_engine_parts import SignallingSet
from metrics import layerwise_transferability
from models import build_model, fresh_initialisation, infer_arch, layer_groups

SMALL = ["resnet29_bottleneck", "densenet63", "vit_w96_p4"]
CPU = ProcessInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_the_bottleneck_resnet_has_resnet50s_blocks():
    model = build_model("resnet29_bottleneck", 10)
    block = model.layer2[0]
    assert [block.conv1.kernel_size, block.conv2.kernel_size, block.conv3.kernel_size] == [(1, 1), (3, 3), (1, 1)]
    assert block.conv2.stride == (2, 2) and block.conv3.out_channels == 4 * block.conv1.out_channels == 128
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [3, 3, 3]
    groups = layer_groups("resnet29_bottleneck", model.state_dict())
    assert groups[1].keys == ("layer1.0.conv1.weight", "layer1.0.conv2.weight", "layer1.0.conv3.weight")


def test_densenet63_has_densenet121s_structure_at_half_the_depth():
    model = build_model("densenet63", 10)
    names = [name for name, _ in model.features.named_children()]
    assert names == ["conv0", "norm0", "relu0", "denseblock1", "transition1", "denseblock2", "transition2",
                     "denseblock3", "transition3", "denseblock4", "norm5"]
    assert [len(getattr(model.features, f"denseblock{i}")) for i in (1, 2, 3, 4)] == [3, 6, 12, 8]
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convolutions) + 1 == 63  # counted as DenseNet-121 counts its 121 layers
    # each dense layer sees every earlier output of its block: 24 + 2 x 12 channels at the third
    assert model.features.denseblock1.denselayer3.conv1.in_channels == 24 + 2 * 12
    with torch.no_grad():
        assert model.features(torch.zeros(2, 3, 32, 32)).shape[-2:] == (4, 4)
    points = layer_groups("densenet63", model.state_dict())
    assert len(points) == 1 + 29 + 3 + 1 and points[-1].is_head


def test_the_narrow_vit_has_vit_smalls_twelve_blocks_on_32_px_patches():
    model = build_model("vit_w96_p4", 10)
    assert model.conv_proj.kernel_size == (4, 4) and model.conv_proj.out_channels == 96
    assert len(model.encoder.layers) == 12 and model.encoder.pos_embedding.shape == (1, 8 * 8 + 1, 96)
    attention = model.encoder.layers[0].self_attention
    assert attention.num_heads == 3 and attention.head_dim == 32
    points = layer_groups("vit_w96_p4", model.state_dict())
    assert len(points) == 12 and not any(point.is_head for point in points)


@pytest.mark.parametrize("arch", SMALL)
def test_inference_from_a_saved_state_dict(arch, tmp_path):
    from utils import load_state_dict_safely, save_state_dict

    save_state_dict(fresh_initialisation(arch, 5, seed=3), tmp_path / "w.pth")
    assert infer_arch(load_state_dict_safely(tmp_path / "w.pth")) == arch


@pytest.mark.parametrize("arch", SMALL)
def test_t_equals_a_hand_computation_on_built_checkpoints(arch):
    """theta_r: the architecture's initialisation; theta_A = theta_r + delta; theta_FB =
    theta_A + eps (random tensors): T of each point is the mean over its tensors of
    mean|r - FB| over the same of mean|A - FB|, computed here tensor by tensor in float64.
    Then FB = A + e and r = FB + k e: T = k at every point but the head."""
    generator = torch.Generator().manual_seed(7)
    theta_r = fresh_initialisation(arch, 5, seed=0)
    noise = {k: torch.randn(v.shape, generator=generator) for k, v in theta_r.items() if v.is_floating_point()}
    theta_a = {k: v + 0.05 * noise[k] if k in noise else v for k, v in theta_r.items()}
    theta_b = {k: v + 0.01 * torch.randn(v.shape, generator=generator) if k in noise else v
               for k, v in theta_a.items()}
    groups = layer_groups(arch, theta_r)
    result = layerwise_transferability(groups, theta_r, theta_a, theta_b)
    for group, layer in zip(groups, result.layers):
        if group.is_head:
            assert layer.transferability == 1.0
            continue
        d_r = sum((theta_r[k].double() - theta_b[k].double()).abs().mean().item() for k in group.keys)
        d_a = sum((theta_a[k].double() - theta_b[k].double()).abs().mean().item() for k in group.keys)
        assert layer.transferability == pytest.approx(d_r / d_a, rel=1e-5), group.name
    k = 3.5
    step = {key: torch.randn(v.shape, generator=generator) for key, v in theta_a.items() if key in noise}
    theta_b = {key: v + 0.01 * step[key] if key in step else v for key, v in theta_a.items()}
    theta_r = {key: v + k * 0.01 * step[key] if key in step else v for key, v in theta_b.items()}
    values = layerwise_transferability(groups, theta_r, theta_a, theta_b).values
    assert values == pytest.approx([1.0 if g.is_head else k for g in groups], rel=1e-4)


def Images32(count: int, signal_at: int | None = None, offset: int = 0) -> SignallingSet:
    """32-px images of two classes (the ViT takes no other size); reading ``signal_at`` sends SIGTERM."""
    return SignallingSet(count, signal_at, offset, size=32)


def fit(arch: str, path, train, val, resume=None, **recipe):
    import engine.loop as loop
    from data.transforms import BatchAugment

    torch.manual_seed(0)
    model = build_model(arch, 2)
    settings = TrainSettings(**{"epochs": 2, "batch_size": 4, "lr": 0.05, "weight_decay": 1e-4, "channels_last": False,
                                "progress": False, "cache": "off", "workers": 0, **recipe})
    result = loop.fit(model, train, val, settings, CPU, path, resume=resume, announce=lambda text: None,
                      augment=BatchAugment(32))
    return result, model


@pytest.mark.parametrize("arch", SMALL)
def test_training_steps_move_every_point_and_a_stopped_run_resumes_bit_for_bit(arch, tmp_path):
    torch.manual_seed(0)  # as fit() builds it
    before = build_model(arch, 2).state_dict()
    result, reference = fit(arch, tmp_path / "a.pth", Images32(8), Images32(4, offset=100))
    assert result.stopped_by == 0 and len(result.history) == 2
    trained = reference.state_dict()
    for group in layer_groups(arch, trained):
        moved = [key for key in group.keys if not torch.equal(trained[key], before[key])]
        assert moved, f"{group.name} did not move in training"
    stopped, _ = fit(arch, tmp_path / "b.pth", Images32(8, signal_at=5), Images32(4, offset=100))
    assert stopped.stopped_by == signal.SIGTERM
    checkpoint = load_checkpoint(tmp_path / "b.last.pth")
    resumed_result, resumed = fit(arch, tmp_path / "b.pth", Images32(8), Images32(4, offset=100), checkpoint)
    assert resumed_result.stopped_by == 0 and len(resumed_result.history) == 2
    for key, tensor in trained.items():
        assert torch.equal(tensor, resumed.state_dict()[key]), key


def test_adamw_with_warm_up_trains_the_vit_and_resumes_bit_for_bit(tmp_path):
    """The recipe beyond the seed's (``--optimizer adamw --warmup_epochs N``): a stop in the
    warm-up's epoch resumes to the weights of a run never stopped (optimizer moments and the
    chained schedule are in the checkpoint)."""
    recipe = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 1, "epochs": 3,
              "schedule": "step", "step_size": 1}
    result, reference = fit("vit_w96_p4", tmp_path / "a.pth", Images32(8), Images32(4, offset=100), **recipe)
    assert [round(entry["lr"], 8) for entry in result.history] == [5e-4, 1e-3, 1e-4]
    stopped, _ = fit("vit_w96_p4", tmp_path / "b.pth", Images32(8, signal_at=3), Images32(4, offset=100), **recipe)
    assert stopped.stopped_by == signal.SIGTERM
    checkpoint = load_checkpoint(tmp_path / "b.last.pth")
    assert all("exp_avg_sq" in state for state in checkpoint["optimizer"]["state"].values())  # Adam's moments
    _, resumed = fit("vit_w96_p4", tmp_path / "b.pth", Images32(8), Images32(4, offset=100), checkpoint, **recipe)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[key]), key


@pytest.mark.parametrize("schedule, expected", [
    ("step", [0.25, 0.5, 0.75, 1.0, 1.0, 0.1, 0.1, 0.01]),
    ("cosine", [0.25, 0.5, 0.75, 1.0, 0.75, 0.25, 0.0, 0.25]),
])
def test_the_warm_up_rises_linearly_then_the_schedule_starts_from_its_end(schedule, expected):
    import warnings

    from engine.optim import build_optimization

    settings = TrainSettings(epochs=6, batch_size=1, lr=1.0, weight_decay=0.0, schedule=schedule, step_size=2,
                             warmup_epochs=3, optimizer="adamw")
    optimization = build_optimization(nn.Linear(2, 2), settings, torch.device("cpu"))
    assert isinstance(optimization.optimizer, torch.optim.AdamW)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scheduler stepped before the optimizer
        for _ in expected:
            lrs.append(optimization.lr)
            optimization.scheduler.step()
    assert lrs == pytest.approx(expected, abs=1e-12)

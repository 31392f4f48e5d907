"""The architecture registry (one registration per architecture) and resolve_arch.

The layer maps themselves and infer_arch on every registered architecture are tested in
tests/test_layer_maps.py.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models import ARCHITECTURES, GENERIC, RESNET, Architecture, Family, build_model, layer_groups, register, resolve_arch
from models.cifar_resnet import CifarResNet
from utils import UserError


def meta_state(arch: str, num_classes: int = 7) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return build_model(arch, num_classes).state_dict()


def mlp_state() -> dict[str, torch.Tensor]:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).state_dict()


# ------------------------------------------------------------------------- registration


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_registration_holds_what_the_architecture_needs(name):
    spec = ARCHITECTURES[name]
    assert spec.name == name and name != GENERIC
    assert isinstance(spec.family, Family) and callable(spec.family.fingerprint) and callable(spec.family.layer_map)
    with torch.device("meta"):
        model = build_model(name, num_classes=7).eval()
    state_dict = model.state_dict()
    assert spec.family.fingerprint(state_dict) == spec.fingerprint  # else infer_arch never picks it
    assert isinstance(model.get_submodule(spec.head), nn.Linear)
    assert spec.family.layer_map(list(state_dict)) == layer_groups(name, state_dict) != []
    size = spec.input_size or 64
    with torch.device("meta"):
        assert model(torch.empty(1, 3, size, size)).shape == (1, 7)
        if spec.input_size is not None:  # built for that size: another one is refused
            with pytest.raises((AssertionError, RuntimeError, ValueError)):
                model(torch.empty(1, 3, size // 2, size // 2))


def test_no_two_registrations_describe_the_same_weights():
    """Fingerprints may coincide (resnext50 would share resnet50's); check_architecture must
    then tell them apart, or infer_arch would always answer the first one registered."""
    states = {name: meta_state(name) for name in ARCHITECTURES}
    for name, state_dict in states.items():
        assert [other for other in ARCHITECTURES if models.check_architecture(other, state_dict) is None] == [name]


def test_one_registration_makes_a_new_architecture_known_everywhere(monkeypatch):
    monkeypatch.setattr(models, "ARCHITECTURES", dict(ARCHITECTURES))  # undone after the test
    spec = register(Architecture("test_resnet26", RESNET, lambda n: CifarResNet(depth=26, num_classes=n),
                                 head="fc", fingerprint=((4, 4, 4), False, 16)))
    assert models.ARCHITECTURES["test_resnet26"] is spec and "test_resnet26" not in ARCHITECTURES
    state_dict = meta_state("test_resnet26")
    assert models.infer_arch(state_dict) == "test_resnet26"
    assert resolve_arch(state_dict, None, "x.pth") == "test_resnet26"
    assert len(layer_groups("test_resnet26", state_dict)) == 1 + 12 + 1
    assert models.num_classes_of("test_resnet26", state_dict) == 7
    for name in ("test_resnet26", "resnet20", GENERIC):
        with pytest.raises(ValueError, match="already registered"):
            register(Architecture(name, RESNET, spec.builder, head="fc", fingerprint=spec.fingerprint))


# ------------------------------------------------------------------------- resolve_arch


def user_error(*args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        resolve_arch(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_resolve_arch_infers_or_checks_the_requested_one():
    state_dict = meta_state("resnet20")
    assert resolve_arch(state_dict, None, "a.pth") == "resnet20"
    assert resolve_arch(state_dict, "resnet20", "a.pth") == "resnet20"
    assert resolve_arch(mlp_state(), GENERIC, "a.pth", allow_generic=True) == GENERIC


def test_resolve_arch_names_the_architecture_it_found_instead():
    message = user_error(meta_state("resnet20"), "resnet32", "-a a.pth")
    assert message.startswith("--arch resnet32 does not match -a a.pth: it is a resnet20 checkpoint")
    assert "fix --arch" in message


def test_resolve_arch_names_the_first_difference_of_an_unknown_checkpoint():
    state_dict = meta_state("resnet20")
    del state_dict["layer2.1.conv2.weight"]
    message = user_error(state_dict, "resnet20", "a.pth", flag="arch")
    assert message.startswith("arch resnet20 does not match a.pth: tensor layer2.1.conv2.weight is missing")


def test_resolve_arch_asks_for_the_flag_when_it_cannot_infer():
    message = user_error(mlp_state(), None, "a.pth")
    assert message.startswith("a.pth: cannot infer the architecture") and "pass --arch NAME" in message
    assert "resnet50" in message and GENERIC not in message
    assert "pass --arch NAME" in user_error(mlp_state(), None, "a.pth", allow_generic=True)
    assert f"--arch {GENERIC}" in user_error(mlp_state(), None, "a.pth", allow_generic=True)


def test_resolve_arch_refuses_unknown_names():
    assert "--arch alexnet: unknown architecture" in user_error(meta_state("resnet20"), "alexnet", "a.pth")
    assert "unknown architecture" in user_error(mlp_state(), GENERIC, "a.pth")  # generic not allowed here


def test_resolve_arch_against_a_reference_checkpoint():
    """Only a recognisably other architecture is refused; other differences are the caller's to report."""
    message = user_error(meta_state("resnet32"), "resnet20", "b.pth", reference="a.pth")
    assert message.startswith("b.pth: is a resnet32 checkpoint but a.pth is resnet20")
    assert "same architecture" in message
    extra = {**meta_state("resnet20"), "extra.weight": torch.empty(3, 3, device="meta")}
    assert resolve_arch(extra, "resnet20", "b.pth", reference="a.pth") == "resnet20"
    assert "tensor extra.weight is not part of resnet20" in user_error(extra, "resnet20", "b.pth")

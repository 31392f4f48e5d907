"""Shared fixtures: small checkpoint trios (theta_r, theta_A, theta_FB) written to tmp_path."""
from __future__ import annotations

import os

# Before torch starts its OpenMP threads: sleep when waiting instead of spinning, so that the
# suite neither crawls nor slows other work when it shares the cores (docs/performance.md, "A
# busy machine"); a policy the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import pytest
import torch

from models import GENERIC, build_model, layer_groups
from models.layer_maps import LayerGroup


def tiny_seeded_state(arch: str = "resnet20", seed: int = 0, num_classes: int = 10) -> dict[str, torch.Tensor]:
    """A freshly initialised model's state dict; the same seed gives the same tensors."""
    torch.manual_seed(seed)
    return build_model(arch, num_classes).state_dict()


@dataclass
class TinyTrio:
    """Paths of the three checkpoint files and what they hold.

    By construction ``theta_r = init``, ``theta_A = init + 2 delta``, ``theta_B = theta_A +
    delta`` (apart from the layers given other values), so every non-head point has
    D(r, B) = k * D(A, B) and T = k exactly (up to float32 rounding): k = 3 by default.
    """

    r: Path
    a: Path
    b: Path
    theta_r: dict[str, torch.Tensor]
    theta_a: dict[str, torch.Tensor]
    theta_b: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    groups: list[LayerGroup]

    def save_b(self, path: Path, state: Mapping[str, torch.Tensor]) -> Path:
        torch.save(dict(state), path)
        return path


def _build_tiny_trio(directory: Path, state: Mapping[str, torch.Tensor] | None = None, arch: str = "resnet20",
                     t_by_layer: Mapping[str, float] | None = None, frozen: tuple[str, ...] = (),
                     seed: int = 0) -> TinyTrio:
    directory.mkdir(parents=True, exist_ok=True)
    init = dict(state) if state is not None else tiny_seeded_state(arch, seed)
    groups = layer_groups(arch if state is None else GENERIC, init)
    k_of_key = {key: float((t_by_layer or {}).get(g.name, 3.0)) for g in groups for key in g.keys}
    frozen_keys = {key for g in groups if g.name in frozen for key in g.keys}
    generator = torch.Generator().manual_seed(seed + 1)
    theta_r, theta_a, theta_b, delta = {}, {}, {}, {}
    for key, tensor in init.items():
        if not tensor.is_floating_point():
            theta_r[key] = theta_a[key] = theta_b[key] = tensor.clone()
            continue
        d = 0.01 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        delta[key] = d
        a = tensor + 2 * d
        k = k_of_key.get(key, 3.0)
        # r - B = (init + (3 - k) d) - (init + 3 d) = -k d: T = k for this tensor.
        theta_r[key] = tensor.clone() if k == 3.0 else tensor + (3.0 - k) * d
        theta_a[key] = a
        theta_b[key] = a.clone() if key in frozen_keys else a + d
    paths = {name: directory / f"{name}.pth" for name in ("r", "a", "b")}
    for name, theta in (("r", theta_r), ("a", theta_a), ("b", theta_b)):
        torch.save(theta, paths[name])
    return TinyTrio(paths["r"], paths["a"], paths["b"], theta_r, theta_a, theta_b, delta, groups)


@pytest.fixture(scope="session")
def build_tiny_trio() -> Callable[..., TinyTrio]:
    """``build_tiny_trio(directory, **kwargs)``: as ``make_tiny_trio`` in any folder (for
    fixtures of a wider scope than a test)."""
    return _build_tiny_trio


@pytest.fixture
def make_tiny_trio(tmp_path: Path) -> Callable[..., TinyTrio]:
    """``make_tiny_trio(name="trio", state=None, arch="resnet20", t_by_layer=None, frozen=())``:
    a trio in ``tmp_path/name``. ``state`` replaces the resnet20 init with any model's state
    dict (grouped with the generic layer map); ``t_by_layer`` gives T per point name;
    ``frozen`` names points whose theta_B equals theta_A."""

    def make(name: str = "trio", **kwargs) -> TinyTrio:
        return _build_tiny_trio(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def tiny_trio(make_tiny_trio) -> TinyTrio:
    """resnet20 trio with T = 3 at every non-head point."""
    return make_tiny_trio()


@pytest.fixture
def tiny_resnet20_state() -> dict[str, torch.Tensor]:
    """Seeded resnet20 state dict (10 classes)."""
    return tiny_seeded_state("resnet20", 0)

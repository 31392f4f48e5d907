"""-r random:SEED and --random_draws K: a fresh initialisation is the very theta_r that
pre-training started from when it used that seed, and K draws give T's mean and spread."""
from __future__ import annotations

import json
import math
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import cal_transferability
import pretrain_on_ImageNet
from metrics import FrozenLayerWarning
from models import build_model, fresh_initialisation
from utils import load_state_dict_safely, run_cli, save_state_dict

PRETRAINING_SEED = 7  # not 0: a draw that ignored the seed would not match
SOURCE = "synthetic:source,classes=6,n=12,n_val=4,size=16"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny pre-training by the engine (theta_r written by it, seed 7) and a theta_FB that
    moved theta_A a little (a stand-in for fine-tuning: T only reads the weights)."""
    root = tmp_path_factory.mktemp("pretrained")
    r, a, b = root / "r.pth", root / "a.pth", root / "b.pth"
    argv = ["--dataset", SOURCE, "--arch", "resnet20", "--batch_size", "16", "--workers", "0", "--device", "cpu",
            "--max_epoch", "1", "--lr", "0.05", "--seed", str(PRETRAINING_SEED), "-r", str(r), "-a", str(a)]
    assert run_cli(pretrain_on_ImageNet.main, argv) == 0
    theta_a = load_state_dict_safely(a)
    generator = torch.Generator().manual_seed(1)
    save_state_dict({k: v + 0.002 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                     for k, v in theta_a.items()}, b)
    return r, a, b


def run(capsys, monkeypatch, *argv) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["cal_transferability.py"])
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # run_cli replaces it
    capsys.readouterr()
    status = run_cli(cal_transferability.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


# ------------------------------------------------------------------ fresh_initialisation


def test_fresh_initialisation_is_the_seeded_build():
    torch.manual_seed(3)
    expected = build_model("resnet20", 10).state_dict()
    drawn = fresh_initialisation("resnet20", 10, 3)
    assert drawn.keys() == expected.keys()
    assert all(torch.equal(drawn[k], expected[k]) for k in expected)
    other = fresh_initialisation("resnet20", 10, 4)
    assert not torch.equal(other["layer1.0.conv1.weight"], drawn["layer1.0.conv1.weight"])


def test_fresh_initialisation_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(5)
    before = torch.get_rng_state()
    fresh_initialisation("resnet20", 10, 9)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    fresh_initialisation("resnet20", 10, 9)
    assert torch.equal(torch.rand(4), expected)
    random.seed(5)
    np.random.seed(5)
    python_next, numpy_next = random.random(), np.random.rand()
    random.seed(5)
    np.random.seed(5)
    fresh_initialisation("resnet20", 10, 9)
    assert (random.random(), np.random.rand()) == (python_next, numpy_next)


def test_fresh_initialisation_of_an_unknown_architecture():
    with pytest.raises(KeyError, match="resnet2000"):
        fresh_initialisation("resnet2000", 10, 0)


def test_pretraining_saves_the_fresh_initialisation_of_its_seed(pretrained):
    r, _, _ = pretrained
    theta_r = load_state_dict_safely(r)
    drawn = fresh_initialisation("resnet20", 6, PRETRAINING_SEED)
    assert theta_r.keys() == drawn.keys()
    assert all(torch.equal(theta_r[k], drawn[k]) for k in drawn)


# ------------------------------------------------------------------------ the command line


def test_random_seed_of_the_pretraining_gives_exactly_the_t_of_its_theta_r(pretrained, capsys, monkeypatch, tmp_path):
    r, a, b = pretrained
    status, saved_out, _ = run(capsys, monkeypatch, "-r", r, "-a", a, "-b", b, "--json", tmp_path / "saved.json",
                               "--no_fig")
    assert status == 0
    with pytest.warns(UserWarning, match=f"--seed {PRETRAINING_SEED}"):
        status, drawn_out, _ = run(capsys, monkeypatch, "-r", f"random:{PRETRAINING_SEED}", "--random_draws", "1",
                                   "-a", a, "-b", b, "--json", tmp_path / "drawn.json", "--no_fig")
    assert status == 0
    assert drawn_out == saved_out
    saved = json.loads((tmp_path / "saved.json").read_text())["results"][0]
    drawn = json.loads((tmp_path / "drawn.json").read_text())["results"][0]
    assert drawn["layers"] == saved["layers"]  # every number, bit for bit
    assert drawn["overall"] == saved["overall"] and drawn["overall_scale_free"] == saved["overall_scale_free"]
    assert drawn["random_draws"] == {
        "k": 1, "seeds": [PRETRAINING_SEED], "overall_mean": saved["overall"], "overall_sd": None,
        "layers": [{"name": layer["name"], "mean": layer["transferability"], "sd": None} for layer in saved["layers"]]}
    # another seed is another theta_r: T differs
    with pytest.warns(UserWarning, match="approximation"):
        status, other_out, _ = run(capsys, monkeypatch, "-r", f"random:{PRETRAINING_SEED + 1}", "-a", a, "-b", b,
                                   "--no_fig")
    assert status == 0 and other_out != saved_out


def test_three_draws_give_the_mean_and_sample_sd_of_three_single_draws(pretrained, capsys, monkeypatch, tmp_path):
    _, a, b = pretrained
    seeds = [PRETRAINING_SEED + i for i in range(3)]
    singles = []
    for seed in seeds:
        path = tmp_path / f"single{seed}.json"
        with pytest.warns(UserWarning, match=f"random:{seed}"):
            status, _, _ = run(capsys, monkeypatch, "-r", f"random:{seed}", "-a", a, "-b", b, "--json", path, "--no_fig")
        assert status == 0
        singles.append(json.loads(path.read_text())["results"][0])
    with pytest.warns(UserWarning) as warned:
        status, out, err = run(capsys, monkeypatch, "-r", f"random:{seeds[0]}", "--random_draws", "3", "-a", a,
                               "-b", b, "--json", tmp_path / "three.json", "--no_fig", "-v")
    assert status == 0, err
    assert [f"seeds {seeds[0]} ... {seeds[2]}" in str(w.message) for w in warned] == [True]  # one for the three
    entry = json.loads((tmp_path / "three.json").read_text())["results"][0]
    draws = entry["random_draws"]
    assert draws["k"] == 3 and draws["seeds"] == seeds

    def mean_sd(values):  # by hand: the mean, and the sample standard deviation (n - 1)
        mean = sum(values) / len(values)
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

    overall_mean, overall_sd = mean_sd([s["overall"] for s in singles])
    assert draws["overall_mean"] == pytest.approx(overall_mean, rel=1e-12)
    assert draws["overall_sd"] == pytest.approx(overall_sd, rel=1e-9)
    assert entry["overall"] == pytest.approx(overall_mean, rel=1e-12)  # the result's overall is the mean
    assert overall_sd > 0
    for i, layer in enumerate(draws["layers"][:-1]):
        mean, sd = mean_sd([s["layers"][i]["transferability"] for s in singles])
        assert layer["name"] == singles[0]["layers"][i]["name"]
        assert layer["mean"] == pytest.approx(mean, rel=1e-12)
        assert layer["sd"] == pytest.approx(sd, rel=1e-9)
        assert entry["layers"][i]["transferability"] == pytest.approx(mean, rel=1e-12)
        scale_free = [s["layers"][i]["transferability_scale_free"] for s in singles]
        assert entry["layers"][i]["transferability_scale_free"] == pytest.approx(sum(scale_free) / 3, rel=1e-12)
    assert draws["layers"][-1] == {"name": "fc", "mean": 1.0, "sd": 0.0}

    lines = out.splitlines()
    assert lines[0] == "theta_FB: b.pth"
    assert "sd(T)" in lines[1]
    assert lines[-4] == "Layer-wise transferability:  " + str([round(layer["mean"], 2) for layer in draws["layers"]])
    assert lines[-3] == f"Overall transferability: {overall_mean:.2f}"
    assert lines[-2].startswith("Overall scale-free transferability: ")
    assert lines[-1] == f"Overall transferability over 3 fresh initialisations: {overall_mean:.2f} ± {overall_sd:.2f}"


def test_drawing_does_not_disturb_the_callers_random_state(pretrained, capsys, monkeypatch):
    _, a, b = pretrained
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    with pytest.warns(UserWarning):
        assert run(capsys, monkeypatch, "-r", "random:0", "--random_draws", "2", "-a", a, "-b", b, "--no_fig")[0] == 0
    assert torch.equal(torch.rand(3), expected)


def test_random_draws_are_refused_with_a_saved_theta_r(pretrained, capsys, monkeypatch):
    r, a, b = pretrained
    status, out, err = run(capsys, monkeypatch, "-r", r, "-a", a, "-b", b, "--random_draws", "3", "--no_fig")
    assert status == 2 and out == ""
    assert err.splitlines() == [f"cal_transferability.py: error: --random_draws 3: needs -r random:SEED (it draws K "
                                f"fresh initialisations); -r {r} is one fixed theta_r, so drop the flag"]


def test_a_frozen_layer_is_warned_once_over_the_draws(pretrained, capsys, monkeypatch, tmp_path):
    """D(theta_A, theta_FB) = 0 does not depend on theta_r: frozen against every draw, one warning,
    no mean and no spread (null in JSON), left out of the overall mean of every draw."""
    _, a, _ = pretrained
    theta_a = load_state_dict_safely(a)
    generator = torch.Generator().manual_seed(2)
    frozen = {k: v.clone() if k.startswith("layer2.1.") or not v.is_floating_point()
              else v + 0.002 * torch.randn(v.shape, generator=generator) for k, v in theta_a.items()}
    b = tmp_path / "b_frozen.pth"
    save_state_dict(frozen, b)
    with pytest.warns(UserWarning) as warned:
        status, out, err = run(capsys, monkeypatch, "-r", "random:0", "--random_draws", "2", "-a", a, "-b", b,
                               "--json", tmp_path / "r.json", "--no_fig")
    assert status == 0, err
    assert [str(w.message) for w in warned if w.category is FrozenLayerWarning] == [
        "1 layer(s) did not change during fine-tuning (D(theta_A, theta_FB) = 0): layer2.1; their transferability "
        "is inf and they are left out of the mean"]
    entry = json.loads((tmp_path / "r.json").read_text())["results"][0]
    layer = entry["random_draws"]["layers"][5]
    assert layer == {"name": "layer2.1", "mean": None, "sd": None}
    assert entry["layers"][5]["status"] == "frozen" and entry["layers"][5]["transferability"] is None
    others = [layer["mean"] for i, layer in enumerate(entry["random_draws"]["layers"][:-1]) if i != 5]
    assert entry["overall"] == pytest.approx(sum(others) / 9, rel=1e-12)

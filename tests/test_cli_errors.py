"""cal_transferability.py end to end: user errors (one line, status 2, nothing written) and
the outputs of valid runs (printout, JSON, CSV, figure) on trios whose answers are known."""
from __future__ import annotations

import csv
import errno
import json
import math
import os
import pathlib
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import cal_transferability
from metrics import FrozenLayerWarning
from models import build_model
from tests.test_checkpoint_io import UNSAFE_FILES, write_unsafe_file
from tests.test_transferability import reference_scale_free
from utils import run_cli

PROG = "cal_transferability.py"
REPO = Path(__file__).resolve().parents[1]
RESNET20_POINTS = ["conv1", "layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2",
                   "layer3.0", "layer3.1", "layer3.2", "fc"]
OLD_CSV = "this file was here before\n"


@dataclass
class CliResult:
    status: int
    out: str
    err: str


@pytest.fixture
def cal_cli(capsys, monkeypatch):
    """``cal_cli(*argv)`` runs ``cal_transferability.main`` in-process as the script would."""
    monkeypatch.setattr(sys, "argv", [PROG])  # the program name of the error prefix
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # run_cli replaces it

    def run(*argv) -> CliResult:
        capsys.readouterr()
        status = run_cli(cal_transferability.main, [str(a) for a in argv])
        out, err = capsys.readouterr()
        return CliResult(status, out, err)

    return run


class GuardedOutputs:
    """--json/--csv/--fig paths in one folder; the CSV exists beforehand with old content."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "outputs"
        self.dir.mkdir(parents=True)
        self.json, self.csv, self.fig = self.dir / "results.json", self.dir / "results.csv", self.dir / "fig.png"
        self.csv.write_text(OLD_CSV)

    def argv(self, **override: object) -> list[str]:
        paths = {"json": self.json, "csv": self.csv, "fig": self.fig, **override}
        return [item for flag, path in paths.items() for item in (f"--{flag}", str(path))]

    def assert_untouched(self) -> None:
        assert not self.json.exists()
        assert not self.fig.exists()
        assert self.csv.read_text() == OLD_CSV
        assert os.listdir(self.dir) == ["results.csv"]  # no temporary file either


@pytest.fixture
def guarded_outputs(tmp_path) -> GuardedOutputs:
    return GuardedOutputs(tmp_path)


def assert_user_error(result: CliResult, *needles: object) -> str:
    """Status 2 and exactly one stderr line, ``prog: error: ...``, naming every needle."""
    assert result.status == 2, (result.out, result.err)
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    line = lines[0]
    assert line.startswith(f"{PROG}: error: "), line
    for needle in needles:
        assert str(needle) in line, (needle, line)
    return line


def trio_argv(trio, *finetuned: Path) -> list[str]:
    return ["-r", str(trio.r), "-a", str(trio.a), "-b", *[str(p) for p in (finetuned or (trio.b,))]]


def printed_values(out: str) -> list[str]:
    """The printed lists, as text: 'Layer-wise transferability:  [...]' lines."""
    prefix = "Layer-wise transferability:  "
    return [line[len(prefix):] for line in out.splitlines() if line.startswith(prefix)]


# ------------------------------------------------------------------------------ unreadable files


def test_missing_finetuned_file(cal_cli, tiny_trio, guarded_outputs, tmp_path):
    missing = tmp_path / "not_there.pth"
    result = cal_cli(*trio_argv(tiny_trio, tiny_trio.b, missing), *guarded_outputs.argv())
    assert_user_error(result, missing, "no such file")
    guarded_outputs.assert_untouched()


def test_directory_as_pretrained(cal_cli, tiny_trio, guarded_outputs, tmp_path):
    folder = tmp_path / "a_folder.pth"
    folder.mkdir()
    result = cal_cli("-r", tiny_trio.r, "-a", folder, "-b", tiny_trio.b, *guarded_outputs.argv())
    assert_user_error(result, folder, "directory")
    guarded_outputs.assert_untouched()


def test_file_that_is_no_checkpoint_as_finetuned(cal_cli, tiny_trio, guarded_outputs, tmp_path):
    notes = tmp_path / "notes.pth"
    notes.write_text("epoch 3, accuracy 0.91\n")
    result = cal_cli(*trio_argv(tiny_trio, notes), *guarded_outputs.argv())
    assert_user_error(result, notes, "not a PyTorch checkpoint")
    guarded_outputs.assert_untouched()


class CreatesFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def malicious_checkpoint(tmp_path: Path, state: dict) -> tuple[Path, Path]:
    """A checkpoint with real weights and a payload that creates ``marker`` when unpickled."""
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({**state, "payload": CreatesFile(marker)}, path)
    return path, marker


def test_malicious_pickle_as_finetuned(cal_cli, tiny_trio, guarded_outputs, tmp_path):
    evil, marker = malicious_checkpoint(tmp_path, tiny_trio.theta_b)
    result = cal_cli(*trio_argv(tiny_trio, evil), *guarded_outputs.argv())
    assert_user_error(result, evil, "unsafe unpickling")
    assert not marker.exists()
    guarded_outputs.assert_untouched()


@pytest.mark.parametrize("kind", sorted(UNSAFE_FILES))
def test_unsafe_payload_as_pretrained_is_refused_by_name(cal_cli, tiny_trio, guarded_outputs, tmp_path, kind):
    """os.system, subprocess.Popen, exec, eval, a class of __main__, nested, raw pickles, a
    zip whose data.pkl holds the payload: "refused", the code named, the payload never run."""
    evil, marker, code = write_unsafe_file(tmp_path, kind)
    result = cal_cli("-r", tiny_trio.r, "-a", evil, "-b", tiny_trio.b, *guarded_outputs.argv())
    line = assert_user_error(result, "unsafe unpickling", "re-save")
    assert line.startswith(f"{PROG}: error: {evil}: refused: loading it would run code from {code} ")
    assert not marker.exists()
    guarded_outputs.assert_untouched()


# -------------------------------------------------------------------- checkpoints that disagree


def test_finetuned_of_another_architecture(cal_cli, tiny_trio, guarded_outputs, tmp_path):
    torch.manual_seed(1)
    other = tiny_trio.save_b(tmp_path / "resnet32_b.pth", build_model("resnet32", 10).state_dict())
    result = cal_cli(*trio_argv(tiny_trio, other), *guarded_outputs.argv())
    line = assert_user_error(result, other, "resnet32")
    assert line.startswith(f"{PROG}: error: {other}:")  # the B file is the one blamed
    guarded_outputs.assert_untouched()


def test_non_head_tensor_missing_from_finetuned(cal_cli, tiny_trio, guarded_outputs, tmp_path):
    theta_b = dict(tiny_trio.theta_b)
    del theta_b["layer2.1.conv2.weight"]
    broken = tiny_trio.save_b(tmp_path / "b_missing.pth", theta_b)
    result = cal_cli(*trio_argv(tiny_trio, broken), *guarded_outputs.argv())
    assert_user_error(result, broken, "layer2.1.conv2.weight", "missing")
    guarded_outputs.assert_untouched()


def test_tensor_of_another_shape_in_random_init(cal_cli, tiny_trio, guarded_outputs, tmp_path):
    theta_r = dict(tiny_trio.theta_r)
    theta_r["layer1.0.conv1.weight"] = torch.randn(16, 16, 1, 1)
    r_path = tmp_path / "r_reshaped.pth"
    torch.save(theta_r, r_path)
    result = cal_cli("-r", r_path, "-a", tiny_trio.a, "-b", tiny_trio.b, *guarded_outputs.argv())
    assert_user_error(result, r_path, "layer1.0.conv1.weight", "[16, 16, 1, 1]")
    guarded_outputs.assert_untouched()


def test_nan_in_a_used_tensor_of_finetuned(cal_cli, tiny_trio, guarded_outputs, tmp_path):
    theta_b = {k: v.clone() for k, v in tiny_trio.theta_b.items()}
    theta_b["layer3.2.conv2.weight"][5, 3, 1, 1] = math.nan
    broken = tiny_trio.save_b(tmp_path / "b_nan.pth", theta_b)
    # The good B comes first: its results must not be written when the second one fails.
    result = cal_cli(*trio_argv(tiny_trio, tiny_trio.b, broken), *guarded_outputs.argv())
    assert_user_error(result, broken, "layer3.2.conv2.weight", "NaN")
    guarded_outputs.assert_untouched()


def test_inf_in_a_used_tensor_of_random_init(cal_cli, tiny_trio, guarded_outputs, tmp_path):
    theta_r = {k: v.clone() for k, v in tiny_trio.theta_r.items()}
    theta_r["conv1.weight"][0, 0, 0, 0] = math.inf
    r_path = tmp_path / "r_inf.pth"
    torch.save(theta_r, r_path)
    result = cal_cli("-r", r_path, "-a", tiny_trio.a, "-b", tiny_trio.b, *guarded_outputs.argv())
    line = assert_user_error(result, r_path, "conv1.weight", "Inf")
    assert str(tiny_trio.b) not in line  # the broken file is r, not B
    guarded_outputs.assert_untouched()


# ------------------------------------------------------------------------------ architectures


def test_arch_flag_that_does_not_match(cal_cli, tiny_trio, guarded_outputs):
    result = cal_cli(*trio_argv(tiny_trio), "--arch", "resnet32", *guarded_outputs.argv())
    assert_user_error(result, "--arch resnet32", tiny_trio.a, "resnet20")
    guarded_outputs.assert_untouched()


def small_mlp_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    return model.state_dict()


def test_unknown_model_asks_for_arch_generic_and_works_with_it(cal_cli, make_tiny_trio, guarded_outputs):
    trio = make_tiny_trio("mlp", state=small_mlp_state(), t_by_layer={"0": 3.0, "2": 5.0})
    result = cal_cli(*trio_argv(trio), *guarded_outputs.argv())
    assert_user_error(result, trio.a, "--arch generic")
    guarded_outputs.assert_untouched()

    result = cal_cli(*trio_argv(trio), "--arch", "generic", "--no_fig")
    assert result.status == 0, result.err
    assert printed_values(result.out) == ["[3.0, 5.0, 1.0]"]  # Linear 0, Linear 2, head (Linear 4)
    assert "Overall transferability: 4.00" in result.out.splitlines()


# ---------------------------------------------------------------------------- output paths


def test_output_path_whose_parent_is_a_regular_file(cal_cli, tiny_trio, guarded_outputs, tmp_path):
    blocker = tmp_path / "plain_file"
    blocker.write_text("x")
    target = blocker / "results.json"
    result = cal_cli(*trio_argv(tiny_trio), *guarded_outputs.argv(json=target))
    assert_user_error(result, f"--json {target}")
    assert blocker.read_text() == "x"
    guarded_outputs.assert_untouched()


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_at_the_end_is_one_line_naming_the_output(cal_cli, tiny_trio, guarded_outputs, monkeypatch):
    monkeypatch.setattr(os, "fsync", _disk_full)
    result = cal_cli(*trio_argv(tiny_trio), *guarded_outputs.argv())
    assert result.status == 2 and "Traceback" not in result.err
    errors = [line for line in result.err.splitlines() if ": error: " in line]
    assert errors == [f"{PROG}: error: --json {guarded_outputs.json}: cannot write (No space left on device); "
                      "nothing was written"], result.err
    assert result.err.splitlines()[-1] == errors[0]
    guarded_outputs.assert_untouched()


def test_a_full_disk_on_the_last_output_leaves_the_others_unwritten(cal_cli, tiny_trio, guarded_outputs, monkeypatch):
    real_fsync, calls = os.fsync, []

    def third_fails(fd):  # the JSON and CSV are staged; the figure, the third, meets a full disk
        calls.append(fd)
        return _disk_full() if len(calls) == 3 else real_fsync(fd)

    monkeypatch.setattr(os, "fsync", third_fails)
    result = cal_cli(*trio_argv(tiny_trio), *guarded_outputs.argv())
    assert result.status == 2 and "Traceback" not in result.err
    assert result.err.splitlines()[-1].startswith(
        f"{PROG}: error: --fig {guarded_outputs.fig}: cannot write (No space left on device); nothing was written")
    guarded_outputs.assert_untouched()  # the JSON and CSV staged before it are gone too


@pytest.mark.parametrize("flag", ["--json", "--csv", "--fig"])
@pytest.mark.parametrize("path", ["/proc/x.png", "/proc/self/nonexistent_dir/x.png", "/sys/x.png"])
def test_output_under_proc_or_sys_is_refused_before_any_work(cal_cli, tiny_trio, tmp_path, flag, path):
    """Refused before the checkpoints are read: the missing -b file is never reached."""
    result = cal_cli(*trio_argv(tiny_trio, tmp_path / "not_there.pth"), flag, path)
    assert_user_error(result, f"{flag} {path}: cannot write files in ")
    assert not os.path.exists(path)


def test_finetune_refuses_b_under_proc_before_training(tiny_trio, tmp_path, capsys, monkeypatch):
    import finetune

    monkeypatch.setattr(sys, "argv", ["finetune.py"])
    argv = ["--dataset", "synthetic:classes=4,n=8,n_val=2,size=16", "--arch", "resnet20", "--device", "cpu",
            "--workers", "0", "--max_epoch", "1", "--batch_size", "4", "-a", str(tiny_trio.a), "-b", "/proc/x.pth"]
    started = time.monotonic()
    assert run_cli(finetune.main, argv) == 2
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("finetune.py: error: -b /proc/x.pth: cannot write files in /proc"), err
    assert elapsed < 20 and not os.path.exists("/proc/x.pth")


def test_figure_with_unknown_suffix(cal_cli, tiny_trio, guarded_outputs):
    figure = guarded_outputs.dir / "fig.xyz"
    result = cal_cli(*trio_argv(tiny_trio), *guarded_outputs.argv(fig=figure))
    assert_user_error(result, f"--fig {figure}", ".png")
    assert not figure.exists()
    guarded_outputs.assert_untouched()


def test_json_path_that_is_a_directory(cal_cli, tiny_trio, guarded_outputs, tmp_path):
    folder = tmp_path / "results.json"
    folder.mkdir()
    result = cal_cli(*trio_argv(tiny_trio), *guarded_outputs.argv(json=folder))
    assert_user_error(result, f"--json {folder}", "directory")
    assert folder.is_dir() and os.listdir(folder) == []
    guarded_outputs.assert_untouched()


# ---------------------------------------------------------------------------------- flags


def test_random_init_seed_that_is_not_an_integer(cal_cli, tiny_trio, guarded_outputs):
    result = cal_cli("-r", "random:abc", "-a", tiny_trio.a, "-b", tiny_trio.b, *guarded_outputs.argv())
    assert_user_error(result, "-r random:abc")
    guarded_outputs.assert_untouched()


@pytest.mark.parametrize("seed", [str(2**64), str(-2**63 - 1), "1e3"])
def test_random_init_seed_out_of_range_is_refused_before_loading(cal_cli, tiny_trio, guarded_outputs, tmp_path, seed):
    """torch.manual_seed takes -2**63 .. 2**64 - 1; checked before the (missing) -a is read."""
    result = cal_cli("-r", f"random:{seed}", "-a", tmp_path / "missing.pth", "-b", tiny_trio.b, *guarded_outputs.argv())
    assert_user_error(result, f"-r random:{seed}: the seed must be")
    guarded_outputs.assert_untouched()


@pytest.mark.parametrize("value", ["1", "3"])
def test_random_draws_without_random_init_is_refused(cal_cli, tiny_trio, guarded_outputs, value):
    """A file given to -r is one fixed theta_r: there is nothing to draw again, whatever K."""
    result = cal_cli(*trio_argv(tiny_trio), "--random_draws", value, *guarded_outputs.argv())
    assert_user_error(result, f"--random_draws {value}: needs -r random:SEED", f"-r {tiny_trio.r}")
    guarded_outputs.assert_untouched()


def test_random_draws_on_the_demo_checkpoints_is_refused(cal_cli, guarded_outputs):
    result = cal_cli("--random_draws", "2", *guarded_outputs.argv())
    assert_user_error(result, "--random_draws 2: needs -r random:SEED")
    guarded_outputs.assert_untouched()


@pytest.mark.parametrize("value,needle", [("0", "--random_draws 0: must be at least 1"),
                                          ("-2", "--random_draws -2: must be at least 1"),
                                          ("two", "--random_draws two: not a whole number")])
def test_random_draws_that_is_not_a_positive_integer(cal_cli, tiny_trio, guarded_outputs, value, needle):
    result = cal_cli("-r", "random:0", "-a", tiny_trio.a, "-b", tiny_trio.b, "--random_draws", value,
                     *guarded_outputs.argv())
    assert_user_error(result, needle)
    guarded_outputs.assert_untouched()


def test_random_draws_whose_seeds_leave_the_generators_range(cal_cli, tiny_trio, guarded_outputs, tmp_path):
    """SEED + K - 1 must still be a seed torch takes (at most 2**64 - 1); checked before reading."""
    last = 2**64 - 1
    ok = cal_cli("-r", f"random:{last - 1}", "-a", tmp_path / "missing.pth", "-b", tiny_trio.b, "--random_draws", "2",
                 *guarded_outputs.argv())
    assert_user_error(ok, "missing.pth")  # the seeds were accepted: the missing file is what is refused
    result = cal_cli("-r", f"random:{last - 1}", "-a", tiny_trio.a, "-b", tiny_trio.b, "--random_draws", "3",
                     *guarded_outputs.argv())
    assert_user_error(result, "--random_draws 3", "2**64 - 1")
    guarded_outputs.assert_untouched()


def test_unknown_fig_metric(cal_cli, tiny_trio, guarded_outputs):
    result = cal_cli(*trio_argv(tiny_trio), "--fig_metric", "sf", *guarded_outputs.argv())
    assert_user_error(result, "--fig_metric", "sf")
    guarded_outputs.assert_untouched()


def test_label_count_that_does_not_match_the_finetuned_files(cal_cli, tiny_trio, guarded_outputs):
    result = cal_cli(*trio_argv(tiny_trio), "--labels", "cifar10", "dtd", *guarded_outputs.argv())
    assert_user_error(result, "--labels", "2 labels", "1 -b")
    guarded_outputs.assert_untouched()


def test_pretrained_without_finetuned(cal_cli, tiny_trio, guarded_outputs):
    result = cal_cli("-r", tiny_trio.r, "-a", tiny_trio.a, *guarded_outputs.argv())
    assert_user_error(result, "-b is required")
    guarded_outputs.assert_untouched()


@pytest.mark.parametrize("argv,needle", [(["--arch", "resnet2000"], "--arch"), (["-b"], "-b/--finetuned"),
                                         (["--no_such_flag"], "--no_such_flag")])
def test_argparse_errors_are_one_line(cal_cli, tiny_trio, guarded_outputs, argv, needle):
    result = cal_cli("-r", tiny_trio.r, "-a", tiny_trio.a, *guarded_outputs.argv(), *argv)
    assert_user_error(result, needle)
    guarded_outputs.assert_untouched()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_device_without_a_gpu(cal_cli, tiny_trio, guarded_outputs):
    result = cal_cli(*trio_argv(tiny_trio), "--device", "cuda", *guarded_outputs.argv())
    assert_user_error(result, "--device cuda")
    guarded_outputs.assert_untouched()


# ------------------------------------------------------------------------------ valid runs


def test_valid_trio_prints_the_seed_format(cal_cli, tiny_trio):
    result = cal_cli(*trio_argv(tiny_trio), "--no_fig")
    assert result.status == 0, result.err
    scale_free = reference_scale_free(tiny_trio.groups, tiny_trio.theta_r, tiny_trio.theta_a, tiny_trio.theta_b)
    assert result.out.splitlines() == [
        f"theta_FB: {tiny_trio.b.name}",
        "Layer-wise transferability:  [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 1.0]",
        "Overall transferability: 3.00",
        f"Overall scale-free transferability: {sum(scale_free[:-1]) / 10:.2f}",
    ]
    # the tiny trio's theta_A is theta_r plus a small step, so the diagnostic note is the only other output
    assert result.err.splitlines() == [
        "note: theta_A is still close to theta_r (median cosine similarity 0.97 over the layers, cos_init with -v); "
        "T is only meaningful when pre-training left the initialisation"]


def test_json_output_schema_and_values(cal_cli, tiny_trio, tmp_path):
    out = tmp_path / "deeper" / "results.json"
    result = cal_cli(*trio_argv(tiny_trio), "--json", out, "--no_fig")
    assert result.status == 0, result.err
    assert f"wrote {out}" in result.err
    data = json.loads(out.read_text())
    assert data["arch"] == "resnet20"
    assert data["random_init"] == str(tiny_trio.r) and data["pretrained"] == str(tiny_trio.a)
    [entry] = data["results"]
    assert entry["finetuned"] == str(tiny_trio.b)
    assert entry["label"] == tiny_trio.b.name
    assert entry["overall"] == pytest.approx(3.0, rel=1e-4)
    layers = entry["layers"]
    assert [layer["name"] for layer in layers] == RESNET20_POINTS
    for layer in layers:
        assert set(layer) == {"name", "transferability", "d_random", "d_pretrained", "d_init", "cos_init", "shrink",
                              "ft_move", "transferability_scale_free", "status"}
    head = layers[-1]
    assert head == {"name": "fc", "transferability": 1.0, "d_random": None, "d_pretrained": None,
                    "d_init": None, "cos_init": None, "shrink": None, "ft_move": None,
                    "transferability_scale_free": 1.0, "status": "head"}
    assert entry["random_draws"] is None  # -r is a file
    # Distances by hand: theta_B - theta_A = delta and theta_B - theta_r = 3 delta.
    stem_d = tiny_trio.delta["conv1.weight"].abs().double().mean().item()
    assert layers[0]["d_pretrained"] == pytest.approx(stem_d, rel=1e-4)
    assert layers[0]["d_random"] == pytest.approx(3 * stem_d, rel=1e-4)
    # theta_A - theta_r = 2 delta: how far pre-training moved the stem, and the cosine of the two
    assert layers[0]["d_init"] == pytest.approx(2 * stem_d, rel=1e-4)
    r, a = tiny_trio.theta_a["conv1.weight"] - 2 * tiny_trio.delta["conv1.weight"], tiny_trio.theta_a["conv1.weight"]
    cosine = torch.nn.functional.cosine_similarity(r.flatten().double(), a.flatten().double(), dim=0).item()
    assert layers[0]["cos_init"] == pytest.approx(cosine, abs=1e-5)
    block = [tiny_trio.delta[f"layer2.0.conv{i}.weight"].abs().double().mean().item() for i in (1, 2)]
    assert layers[4]["d_pretrained"] == pytest.approx(sum(block) / 2, rel=1e-4)  # downsample not counted
    for layer in layers[:-1]:
        assert layer["status"] == "layer"
        assert layer["transferability"] == pytest.approx(3.0, rel=1e-4)
    # shrink = mean|theta_r| / mean|theta_A|, ft_move = D(theta_A, theta_FB) / mean|theta_A|, by hand
    mean_abs = lambda theta, key: theta[key].abs().double().mean().item()  # noqa: E731
    abs_a = mean_abs(tiny_trio.theta_a, "conv1.weight")
    assert layers[0]["shrink"] == pytest.approx(mean_abs(tiny_trio.theta_r, "conv1.weight") / abs_a, rel=1e-6)
    assert layers[0]["ft_move"] == pytest.approx(stem_d / abs_a, rel=1e-4)
    block_abs = [(mean_abs(tiny_trio.theta_r, key), mean_abs(tiny_trio.theta_a, key))
                 for key in ("layer2.0.conv1.weight", "layer2.0.conv2.weight")]
    assert layers[4]["shrink"] == pytest.approx(sum(r for r, _ in block_abs) / sum(a for _, a in block_abs), rel=1e-6)
    scale_free = reference_scale_free(tiny_trio.groups, tiny_trio.theta_r, tiny_trio.theta_a, tiny_trio.theta_b)
    assert [layer["transferability_scale_free"] for layer in layers] == pytest.approx(scale_free, rel=1e-5)
    assert entry["overall_scale_free"] == pytest.approx(sum(scale_free[:-1]) / 10, rel=1e-5)


def test_two_finetuned_checkpoints_give_two_results_csv_rows_and_one_png(cal_cli, tiny_trio, tmp_path):
    # theta_B2 = theta_A + 2 delta: D(r, B2) = 4 |delta|, D(A, B2) = 2 |delta|, so T = 2.
    b2 = tiny_trio.save_b(tmp_path / "b2.pth", {k: v + 2 * tiny_trio.delta[k] if k in tiny_trio.delta else v
                                                  for k, v in tiny_trio.theta_a.items()})
    out = tmp_path / "out"
    result = cal_cli("-r", tiny_trio.r, "-a", tiny_trio.a, "-b", tiny_trio.b, "-b", b2,  # -b repeated
                     "--labels", "cifar10", "dtd",
                     "--json", out / "r.json", "--csv", out / "r.csv", "--fig", out / "fig.png")
    assert result.status == 0, result.err
    assert printed_values(result.out) == ["[3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 1.0]",
                                          "[2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0]"]
    assert [line for line in result.out.splitlines() if line.startswith("Overall transferability")] == [
        "Overall transferability: 3.00", "Overall transferability: 2.00"]

    data = json.loads((out / "r.json").read_text())
    assert [(e["finetuned"], e["label"]) for e in data["results"]] == [(str(tiny_trio.b), "cifar10"),
                                                                       (str(b2), "dtd")]
    assert [round(e["overall"], 4) for e in data["results"]] == [3.0, 2.0]

    with open(out / "r.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["finetuned", "label", "overall", "overall_scale_free", "index", "layer",
                             "transferability", "d_random", "d_pretrained", "d_init", "cos_init", "shrink", "ft_move",
                             "transferability_scale_free", "status"]
    results = json.loads((out / "r.json").read_text())["results"]
    for row, layer in zip(rows, results[0]["layers"] + results[1]["layers"]):  # the CSV holds what the JSON holds
        for key in ("shrink", "ft_move", "transferability_scale_free"):
            assert (float(row[key]) if row[key] else None) == layer[key]
    assert float(rows[0]["overall_scale_free"]) == results[0]["overall_scale_free"]
    assert rows[10]["shrink"] == rows[10]["ft_move"] == "" and rows[10]["transferability_scale_free"] == "1.0"
    assert rows[0]["d_init"] == rows[11]["d_init"] != "" and rows[10]["cos_init"] == ""  # per pair, not per -b
    assert len(rows) == 2 * len(RESNET20_POINTS)
    assert [(r["label"], int(r["index"]), r["layer"]) for r in rows] == [
        (label, i, name) for label in ("cifar10", "dtd") for i, name in enumerate(RESNET20_POINTS, 1)]
    assert [round(float(r["transferability"]), 4) for r in rows[10:12]] == [1.0, 2.0]

    assert (out / "fig.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(os.listdir(out)) == ["fig.png", "r.csv", "r.json"]  # one figure, no temporaries


def test_verbose_table_shows_shrink_and_the_scale_free_t(cal_cli, tiny_trio, tmp_path):
    result = cal_cli(*trio_argv(tiny_trio), "-v", "--json", tmp_path / "r.json", "--no_fig")
    assert result.status == 0, result.err
    lines = result.out.splitlines()
    header = lines[1].split()
    assert header[-3:] == ["shrink", "T_sf", "status"]
    layers = json.loads((tmp_path / "r.json").read_text())["results"][0]["layers"]
    for line, layer in zip(lines[2:13], layers):
        cells = line.split()
        assert cells[1] == layer["name"]
        if layer["status"] == "head":
            assert cells[-3:] == ["-", "1.00", "head"]
        else:
            assert cells[-3:] == [f"{layer['shrink']:.3f}", f"{layer['transferability_scale_free']:.2f}", "layer"]
    assert lines[13].startswith("Layer-wise transferability:")


@pytest.mark.parametrize("metric", ["T", "scale_free", "both"])
def test_fig_metric_draws_t_the_scale_free_t_or_both(cal_cli, tiny_trio, tmp_path, monkeypatch, metric):
    """The figure's lines hold the printed numbers: T solid; the scale-free T dashed in T's
    colour with 'both'; the y label says which."""
    import plotting

    drawn = []
    monkeypatch.setattr(plotting, "_encode", lambda fig, fmt: drawn.append(fig) or b"image")
    b2 = tiny_trio.save_b(tmp_path / "b2.pth", {k: v + 2 * tiny_trio.delta[k] if k in tiny_trio.delta else v
                                                  for k, v in tiny_trio.theta_a.items()})
    result = cal_cli(*trio_argv(tiny_trio, tiny_trio.b, b2), "--json", tmp_path / "r.json",
                     "--fig", tmp_path / "fig.png", "--fig_metric", metric)
    assert result.status == 0, result.err
    assert (tmp_path / "fig.png").read_bytes() == b"image"
    [fig] = drawn
    [ax] = fig.axes
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    plain = [[layer["transferability"] for layer in entry["layers"]] for entry in results]
    scale_free = [[layer["transferability_scale_free"] for layer in entry["layers"]] for entry in results]
    lines = [line for line in ax.get_lines() if line.get_gid() == "curve"]
    # the head (last point, 1 by definition) is drawn apart from the measured curves
    plain = [values[:-1] for values in plain]
    scale_free = [values[:-1] for values in scale_free]
    [head] = [line for line in ax.get_lines() if line.get_gid() == "head"]
    assert list(head.get_xdata()) == [11] and list(head.get_ydata()) == [1.0]
    ys = [list(line.get_ydata()) for line in lines]
    styles = [line.get_linestyle() for line in lines]
    if metric == "T":
        assert ys == [pytest.approx(v) for v in plain] and styles == ["-", "-"]
        assert ax.get_ylabel() == "transferability T"
    elif metric == "scale_free":
        assert ys == [pytest.approx(v) for v in scale_free] and styles == ["-", "-"]
        assert "scale-free" in ax.get_ylabel() and "T_sf" in ax.get_ylabel()
    else:
        assert ys == [pytest.approx(v) for pair in zip(plain, scale_free) for v in pair]
        assert styles == ["-", "--", "-", "--"]
        assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color() == lines[3].get_color()
        assert "solid" in ax.get_ylabel() and "dashed" in ax.get_ylabel()


def test_finetuned_head_with_another_class_count(cal_cli, tiny_trio, tmp_path):
    theta_b = dict(tiny_trio.theta_b)
    theta_b["fc.weight"], theta_b["fc.bias"] = torch.randn(5, 64), torch.randn(5)
    b5 = tiny_trio.save_b(tmp_path / "b_5_classes.pth", theta_b)
    result = cal_cli(*trio_argv(tiny_trio, b5), "--no_fig")
    assert result.status == 0, result.err
    assert printed_values(result.out) == ["[3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 1.0]"]


def test_random_init_seed_redraws_the_seeded_initialisation(cal_cli, tiny_trio):
    # The trio's theta_r is resnet20 initialised after torch.manual_seed(0), so -r random:0
    # must give exactly the same numbers as -r r.pth, and warn that it is an approximation.
    saved = cal_cli(*trio_argv(tiny_trio), "--no_fig")
    with pytest.warns(UserWarning, match="approximation"):
        drawn = cal_cli("-r", "random:0", "-a", tiny_trio.a, "-b", tiny_trio.b, "--no_fig")
    assert drawn.status == 0, drawn.err
    assert drawn.out == saved.out
    assert "Overall transferability: 3.00" in drawn.out.splitlines()


FROZEN_T = {"conv1": 2, "layer1.0": 3, "layer1.1": 4, "layer1.2": 5, "layer2.0": 6, "layer2.1": 7,
            "layer2.2": 8, "layer3.0": 9, "layer3.1": 10, "layer3.2": 11}


def test_frozen_layer_is_inf_warned_null_in_json_and_left_out_of_the_mean(cal_cli, make_tiny_trio, tmp_path):
    trio = make_tiny_trio("frozen", t_by_layer=FROZEN_T, frozen=("layer2.1",))
    out = tmp_path / "out"
    with pytest.warns(FrozenLayerWarning, match="layer2.1"):
        result = cal_cli(*trio_argv(trio), "--json", out / "r.json", "--csv", out / "r.csv", "--no_fig")
    assert result.status == 0, result.err
    assert printed_values(result.out) == ["[2.0, 3.0, 4.0, 5.0, 6.0, inf, 8.0, 9.0, 10.0, 11.0, 1.0]"]
    # Mean of the other nine non-head points: (2+3+4+5+6+8+9+10+11) / 9 = 58 / 9 = 6.44.
    assert "Overall transferability: 6.44" in result.out.splitlines()

    layers = json.loads((out / "r.json").read_text())["results"][0]["layers"]
    frozen = layers[5]
    assert frozen["name"] == "layer2.1" and frozen["status"] == "frozen"
    assert frozen["transferability"] is None and frozen["d_pretrained"] == 0.0
    assert frozen["transferability_scale_free"] is None and frozen["ft_move"] == 0.0  # inf on both scales
    assert frozen["d_random"] > 0
    assert json.loads((out / "r.json").read_text())["results"][0]["overall"] == pytest.approx(58 / 9, rel=1e-4)
    with open(out / "r.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[5]["layer"] == "layer2.1" and rows[5]["transferability"] == "inf" and rows[5]["status"] == "frozen"


# ------------------------------------------------------------- as a script, in a subprocess


@dataclass
class ScriptRun:
    proc: subprocess.CompletedProcess
    paths: dict


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory, build_tiny_trio) -> dict[str, ScriptRun]:
    """``python cal_transferability.py ...`` three times, started together (each run spends
    its ~3 s importing torch, so they overlap on the CPU cores)."""
    root = tmp_path_factory.mktemp("script")
    trio = build_tiny_trio(root / "trio")
    frozen = build_tiny_trio(root / "frozen", frozen=("layer3.0",))
    missing = root / "not_there.pth"
    evil, marker = malicious_checkpoint(root, trio.theta_b)
    outputs = {name: GuardedOutputs(root / name) for name in ("missing", "evil")}
    cases = {
        "missing": (trio_argv(trio, missing) + outputs["missing"].argv(), {"missing": missing}),
        "evil": (trio_argv(trio, evil) + outputs["evil"].argv(), {"evil": evil, "marker": marker}),
        "warnings": (["-r", "random:0", "-a", str(frozen.a), "-b", str(frozen.b), "--no_fig"], {}),
    }
    started = {name: (subprocess.Popen([sys.executable, PROG, *argv], cwd=REPO, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True), argv)
               for name, (argv, _) in cases.items()}
    runs = {}
    for name, (popen, argv) in started.items():
        out, err = popen.communicate(timeout=120)
        proc = subprocess.CompletedProcess(popen.args, popen.returncode, out, err)
        runs[name] = ScriptRun(proc, {**cases[name][1], "outputs": outputs.get(name)})
    return runs


def refusal(run: ScriptRun, culprit: str) -> str:
    """The script's last stderr line, checked to be a one-line error naming ``run.paths[culprit]``
    (exit 2, no traceback, no output file touched)."""
    proc = run.proc
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"{PROG}: error: {run.paths[culprit]}")
    run.paths["outputs"].assert_untouched()
    return last


def test_script_missing_finetuned_file(script_runs):
    refusal(script_runs["missing"], "missing")
    assert script_runs["missing"].proc.stdout == ""


def test_script_refuses_malicious_pickle(script_runs):
    assert "unsafe unpickling" in refusal(script_runs["evil"], "evil")
    assert not script_runs["evil"].paths["marker"].exists()


def test_script_prints_warnings_on_stderr(script_runs):
    """Drawn initialisation and a frozen layer: each warning is one line on the real stderr."""
    proc = script_runs["warnings"].proc
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warning_lines = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning_lines) == 2, proc.stderr
    assert "-r random:0" in warning_lines[0] and "approximation" in warning_lines[0]
    assert "layer3.0" in warning_lines[1] and "inf" in warning_lines[1]
    assert "Layer-wise transferability:  [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, inf, 3.0, 3.0, 1.0]" in proc.stdout
    assert "Overall transferability: 3.00" in proc.stdout


# --------------------------------- training scripts: the augmentation flags (engine/cli.py)


TRAINING_SCRIPT = "pretrain_on_ImageNet.py"
TRAINING_REFUSALS = {  # case: (flags, how the error line starts after "error: ")
    "jitter_below_zero": (["--color_jitter", "-0.1"], "--color_jitter -0.1: must be at least 0 and at most 1"),
    "jitter_above_one": (["--color_jitter", "2"], "--color_jitter 2: must be at least 0 and at most 1"),
    "pil_with_cache_on": (["--augment", "pil", "--cache", "on"], "--cache on: --augment pil"),
}


@pytest.fixture(scope="module")
def training_refusals(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """``python pretrain_on_ImageNet.py`` on a tiny synthetic task with each bad flag, each
    writing into its own empty folder; started together, as ``script_runs``."""
    root = tmp_path_factory.mktemp("training_refusals")
    started = {}
    for name, (flags, _) in TRAINING_REFUSALS.items():
        folder = root / name
        folder.mkdir()
        argv = ["--dataset", "synthetic:source,classes=4,n=8,n_val=2,size=16", "--arch", "resnet20",
                "--device", "cpu", "--max_epoch", "1", "-r", str(folder / "r.pth"), "-a", str(folder / "a.pth"),
                *flags]
        started[name] = (subprocess.Popen([sys.executable, TRAINING_SCRIPT, *argv], cwd=REPO, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True), folder)
    runs = {}
    for name, (popen, folder) in started.items():
        out, err = popen.communicate(timeout=120)
        runs[name] = (subprocess.CompletedProcess(popen.args, popen.returncode, out, err), folder)
    return runs


@pytest.mark.parametrize("case", list(TRAINING_REFUSALS))
def test_training_script_refuses_bad_augmentation_flags(training_refusals, case):
    """Exit 2, one ``prog: error: --flag value: ...`` line, no traceback, nothing written."""
    proc, folder = training_refusals[case]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{TRAINING_SCRIPT}: error: {TRAINING_REFUSALS[case][1]}"), lines
    assert proc.stdout == ""
    assert list(folder.iterdir()) == []


def test_device_defaults_to_cpu_here_and_auto_elsewhere():
    """A ResNet-50 trio takes ~66 ms on the CPU, less than starting CUDA and copying the weights;
    the scripts that run models keep ``auto``."""
    import argparse

    from utils import add_device_flag

    trio = ["-r", "r.pth", "-a", "a.pth", "-b", "b.pth"]
    assert cal_transferability.parse_args(trio).device == "cpu"
    assert cal_transferability.parse_args([*trio, "--device", "cuda"]).device == "cuda"
    parser = argparse.ArgumentParser()
    add_device_flag(parser)
    assert parser.parse_args([]).device == "auto" and "(default: auto)" in parser.format_help()


# ------------------------------------------------- training scripts: numbers checked at parse time

TRAINING_NUMBERS = [("--batch_size", "0"), ("--batch_size", "-3"), ("--lr", "-1"), ("--lr", "0"),
                    ("--weight_decay", "-1"), ("--norm_weight_decay", "-0.1"), ("--momentum", "-0.5"),
                    ("--workers", "-1"), ("--max_epoch", "0"), ("--seed", "-1"), ("--img_size", "4"),
                    ("--color_jitter", "1.5"), ("--lr", "nan"), ("--batch_size", "two")]


@pytest.mark.parametrize("flag,value", TRAINING_NUMBERS + [("--lr_step", "0")])
def test_pretraining_refuses_a_bad_number_before_writing_anything(tmp_path, capsys, flag, value):
    import pretrain_on_ImageNet
    from utils import run_cli

    argv = ["--dataset", "synthetic:classes=3,n=4,n_val=2,size=16", "--arch", "resnet20", "--device", "cpu",
            "-r", str(tmp_path / "r.pth"), "-a", str(tmp_path / "a.pth"), flag, value]
    assert run_cli(pretrain_on_ImageNet.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} {value}" in err[0] and "Traceback" not in err[0]
    assert list(tmp_path.iterdir()) == []  # theta_r is not written either


@pytest.mark.parametrize("flag,value", TRAINING_NUMBERS)
def test_finetuning_refuses_a_bad_number_in_one_line(tmp_path, capsys, flag, value):
    import finetune
    from utils import run_cli

    argv = ["--dataset", "synthetic:classes=3,n=4,n_val=2,size=16", "-a", "a.pth", "-b", str(tmp_path / "b.pth"),
            flag, value]
    assert run_cli(finetune.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} {value}" in err[0]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ one file in two roles


@pytest.mark.parametrize("roles, problem", [
    (("r", "a"), "1 for every layer by definition"),
    (("a", "b"), "undefined"),
    (("r", "b"), "0 for every layer"),
])
@pytest.mark.parametrize("link", ["same path", "symlink", "hardlink"])
def test_one_file_in_two_roles_is_refused(cal_cli, tiny_trio, guarded_outputs, tmp_path, roles, problem, link):
    paths = {"r": tiny_trio.r, "a": tiny_trio.a, "b": tiny_trio.b}
    first, second = roles
    alias = paths[first]
    if link != "same path":
        alias = tmp_path / f"alias_{first}.pth"
        (os.symlink if link == "symlink" else os.link)(paths[first], alias)
    paths[second] = alias
    result = cal_cli("-r", paths["r"], "-a", paths["a"], "-b", paths["b"], *guarded_outputs.argv())
    line = assert_user_error(result, f"-{first} {tiny_trio.__dict__[first]}", f"-{second} {alias}", "same file",
                             problem)
    assert "nan" not in line.lower() or "undefined" in line
    assert result.out == ""
    guarded_outputs.assert_untouched()


def test_random_init_and_distinct_files_are_not_refused(cal_cli, tiny_trio, tmp_path):
    # (a copy of a file in another role is refused by content: tests/test_no_silent_errors.py)
    with pytest.warns(UserWarning, match="approximation"):
        assert cal_cli("-r", "random:0", "-a", tiny_trio.a, "-b", tiny_trio.b, "--no_fig").status == 0
    assert cal_cli("-r", tiny_trio.r, "-a", tiny_trio.a, "-b", tiny_trio.b, tiny_trio.b, "--no_fig").status == 0


def test_figure_formats_in_the_error_are_those_accepted(cal_cli, tiny_trio, tmp_path):
    from plotting import figure_formats

    line = assert_user_error(cal_cli(*trio_argv(tiny_trio), "--fig", tmp_path / "fig.xyz"), "fig.xyz",
                             "unknown image format")
    listed = line.split("end the name in one of ", 1)[1].split(", ")
    assert listed == [f".{fmt}" for fmt in figure_formats()] and {".png", ".pdf", ".svg", ".jpg"} <= set(listed)
    for suffix in (".jpg", ".eps"):  # more than the three formats the message used to name
        assert cal_cli(*trio_argv(tiny_trio), "--fig", tmp_path / f"fig{suffix}").status == 0
        assert (tmp_path / f"fig{suffix}").stat().st_size > 0
    assert ".eps" in " ".join(cal_cli("--help").out.split())  # the help names them too

"""Issue 20, class 4: inputs that used to give a wrong answer with exit status 0 are refused
on one line (a damaged checkpoint, a copy in two roles, a repeated CSV column, weights that
loading would cast or that hold NaN/Inf), in every script that reads them."""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
import torch

import analyze
import cal_transferability
import finetune
from cli_helpers import FAST, TARGET, refused
from utils import run_cli

REPO = Path(__file__).resolve().parents[1]


def flip_a_tensor_byte(source: Path, target: Path) -> Path:
    """A copy of a zip-format checkpoint with one bit flipped inside the first tensor's bytes."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        member = next(info for info in archive.infolist() if "/data/" in info.filename and info.file_size > 64)
        local_extra = int.from_bytes(data[member.header_offset + 28:member.header_offset + 30], "little")
        start = member.header_offset + 30 + len(member.filename.encode()) + local_extra
    data[start + member.file_size // 2] ^= 0x01
    target.write_bytes(bytes(data))
    return target


def trio_argv(trio, **replace) -> list[str]:
    files = {"-r": trio.r, "-a": trio.a, "-b": trio.b, **replace}
    return [part for flag, path in files.items() for part in (flag, str(path))] + ["--no_fig"]


@pytest.mark.parametrize("role", ["-r", "-a", "-b"])
def test_a_damaged_checkpoint_is_refused_not_measured(capsys, tmp_path, tiny_trio, role):
    original = {"-r": tiny_trio.r, "-a": tiny_trio.a, "-b": tiny_trio.b}[role]
    damaged = flip_a_tensor_byte(original, tmp_path / "damaged.pth")
    assert torch.load(damaged, weights_only=True).keys() == torch.load(original, weights_only=True).keys()
    refused(capsys, cal_transferability.main, trio_argv(tiny_trio, **{role: damaged}), str(damaged), "damaged",
            "checksum")


def test_a_damaged_checkpoint_is_refused_by_fine_tuning_resuming_and_the_estimators(capsys, tmp_path, tiny_trio):
    damaged = flip_a_tensor_byte(tiny_trio.a, tmp_path / "damaged.pth")
    refused(capsys, finetune.main, ["--dataset", TARGET, *FAST, "-a", str(damaged), "-b", str(tmp_path / "b.pth")],
            "damaged")
    refused(capsys, analyze.main, ["estimators", "--dataset", "synthetic:classes=3,n=8", "-a", str(damaged)], "damaged")
    b = tmp_path / "b.pth"
    assert run_cli(finetune.main, ["--dataset", TARGET, *FAST, "-a", str(tiny_trio.a), "-b", str(b)]) == 0
    last = flip_a_tensor_byte(tmp_path / "b.last.pth", tmp_path / "c.last.pth")
    refused(capsys, finetune.main, ["--dataset", TARGET, *FAST, "-a", str(tiny_trio.a), "-b",
                                    str(tmp_path / "c.pth"), "--resume", str(last)], "--resume", "damaged")
    assert not (tmp_path / "c.pth").exists()


@pytest.mark.parametrize("copied,into,problem", [("a", "b", "T undefined"), ("r", "a", "T is then 1"),
                                                 ("r", "b", "T 0 for every layer")])
def test_a_byte_copy_in_two_roles_is_refused_like_the_same_path(capsys, tmp_path, tiny_trio, copied, into, problem):
    copy = tmp_path / "copy.pth"
    shutil.copyfile(getattr(tiny_trio, copied), copy)
    refused(capsys, cal_transferability.main, trio_argv(tiny_trio, **{f"-{into}": copy}),
            f"-{into} {copy} holds the same weights as -{copied}", problem)


def test_a_resaved_copy_is_a_copy_and_one_frozen_layer_is_only_a_warning(capsys, tmp_path, make_tiny_trio):
    trio = make_tiny_trio()
    resaved = tmp_path / "resaved.pth"
    torch.save({key: value.clone() for key, value in trio.theta_a.items()}, resaved)  # other bytes, same weights
    refused(capsys, cal_transferability.main, trio_argv(trio, **{"-b": resaved}), "holds the same weights")
    frozen = make_tiny_trio("frozen", frozen=(trio.groups[1].name,))
    with pytest.warns(Warning, match="did not change during fine-tuning"):
        assert run_cli(cal_transferability.main, trio_argv(frozen)) == 0


def test_a_repeated_column_of_the_regression_table_is_refused(capsys, tmp_path):
    lines = (REPO / "data" / "paper_table.csv").read_text().splitlines()
    header = lines[0].split(",")
    for column in ("T", "G", "dataset"):
        table = tmp_path / f"twice_{column}.csv"
        table.write_text("\n".join(f"{line},{line.split(',')[header.index(column)]}" for line in
                                   [",".join(header)] + lines[1:]) + "\n")
        refused(capsys, analyze.main, ["regress", str(table)], str(table), repr(column), "more than once")
    padded = tmp_path / "padded.csv"  # empty names (trailing commas) are not columns anyone fits
    padded.write_text("\n".join(line + ",," for line in lines) + "\n")
    assert run_cli(analyze.main, ["regress", str(padded), "--no_fig"]) == 0


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_starting_weights_that_loading_would_cast_are_refused(capsys, tmp_path, tiny_trio, dtype):
    key = "conv1.weight"
    bad = {k: v.clone() for k, v in tiny_trio.theta_a.items()}
    bad[key] = bad[key].to(dtype) if dtype != torch.complex64 else bad[key].to(dtype) * 1j
    path = tmp_path / "int.pth"
    torch.save(bad, path)
    name = str(dtype).replace("torch.", "")
    refused(capsys, finetune.main, ["--dataset", TARGET, *FAST, "-a", str(path), "-b", str(tmp_path / "b.pth")],
            f"-a {path}", key, name)
    refused(capsys, analyze.main, ["estimators", "--dataset", "synthetic:classes=3,n=8", "-a", str(path)], key, name)
    assert not (tmp_path / "b.pth").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("key", ["layer1.0.conv1.weight", "fc.weight", "bn1.running_var"])
def test_non_finite_starting_weights_are_refused_as_broken_not_as_a_learning_rate(capsys, tmp_path, tiny_trio,
                                                                                 key, value):
    bad = {k: v.clone() for k, v in tiny_trio.theta_a.items()}
    bad[key].view(-1)[0] = value
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    if not key.startswith("fc."):  # fine-tuning replaces the head
        message = refused(capsys, finetune.main, ["--dataset", TARGET, *FAST, "-a", str(path), "-b",
                                                  str(tmp_path / "b.pth")], key, "NaN or Inf")
        assert "--lr" not in message
    refused(capsys, analyze.main, ["estimators", "--dataset", "synthetic:classes=3,n=8", "-a", str(path)], key,
            "NaN or Inf")


def test_integer_or_broken_weights_in_a_resume_checkpoint_are_refused(capsys, tmp_path, tiny_trio):
    b = tmp_path / "b.pth"
    assert run_cli(finetune.main, ["--dataset", TARGET, *FAST, "-a", str(tiny_trio.a), "-b", str(b)]) == 0
    for name, change in (("int", lambda t: t.to(torch.int64)), ("nan", lambda t: t * float("nan"))):
        checkpoint = torch.load(tmp_path / "b.last.pth", weights_only=True)
        checkpoint["model"]["conv1.weight"] = change(checkpoint["model"]["conv1.weight"])
        bad = tmp_path / f"{name}.last.pth"
        torch.save(checkpoint, bad)
        refused(capsys, finetune.main, ["--dataset", TARGET, *FAST, "-a", str(tiny_trio.a), "-b",
                                        str(tmp_path / f"{name}.pth"), "--resume", str(bad)],
                f"--resume {bad}", "conv1.weight")


def test_the_checksum_is_zips_with_or_without_isal(monkeypatch, tmp_path, tiny_trio):
    import sys
    import zlib

    import utils

    data = tiny_trio.a.read_bytes()
    assert utils._crc32(data) == zlib.crc32(data)
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)  # not installed: zlib's is used
    assert utils._crc32(data) == zlib.crc32(data)
    damaged = flip_a_tensor_byte(tiny_trio.a, tmp_path / "damaged.pth")
    assert "bad CRC-32" in utils._zip_checksums_problem(damaged)
    assert utils._zip_checksums_problem(tiny_trio.a) is None

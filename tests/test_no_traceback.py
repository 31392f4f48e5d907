"""Issue 20, classes 5-7: inputs that used to end in a traceback end in one line (status 2),
messages name only files and flags that exist and say what happened, and a process of a
distributed run says what it waits for and stops after --dist_timeout."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import analyze
import cal_transferability
import finetune
import pretrain_on_ImageNet
from cli_helpers import FAST, TARGET, refused
from utils import run_cli

REPO = Path(__file__).resolve().parents[1]
FOLDER = ["--batch_size", "4", "--workers", "0", "--device", "cpu", "--max_epoch", "1", "--img_size", "16"]


def image_folder(root: Path, classes=(b"a", b"b"), per_class: int = 6) -> Path:
    for name in classes:
        folder = os.path.join(os.fsencode(root), name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (40 * i, 10 * len(name), 0)).save(os.path.join(folder, b"%d.png" % i))
    return root


# ------------------------------------------------------------------------- 5. tracebacks


@pytest.mark.parametrize("skip", [False, True])
def test_an_image_over_the_decompression_bomb_limit_is_a_corrupt_image(capsys, tmp_path, tiny_trio, skip,
                                                                       monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # the limit, scaled down: 2x it is refused
    folder = image_folder(tmp_path / "data")
    Image.new("RGB", (40, 40)).save(folder / "a" / "huge.png")
    argv = ["--dataset", f"imagefolder:{folder}", *FOLDER, "-a", str(tiny_trio.a), "-b", str(tmp_path / "b.pth"),
            "--cache", "off"]
    if skip:
        assert run_cli(finetune.main, [*argv, "--skip_corrupt"]) == 0
        assert "corrupt image" in capsys.readouterr().out
    else:
        refused(capsys, finetune.main, argv, "huge.png", "decompression bomb", "--skip_corrupt")


@pytest.mark.parametrize("cache", ["off", "disk", "auto"])
def test_folder_and_file_names_that_are_not_utf8_train_and_measure(capfd, tmp_path, tiny_trio, cache):
    folder = image_folder(tmp_path / "data", classes=(b"caf\xe9", b"ok"))
    Image.new("RGB", (16, 16)).save(os.path.join(os.fsencode(folder / "ok"), b"\xff\xfe.png"))
    b = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"b\xff.pth"))
    assert run_cli(finetune.main, ["--dataset", f"imagefolder:{folder}", *FOLDER, "-a", str(tiny_trio.a), "-b", b,
                                   "--cache", cache, "--cache_dir", str(tmp_path / "cache")]) == 0
    assert Path(b).exists()
    assert "Traceback" not in capfd.readouterr().err


def test_a_non_utf8_checkpoint_name_is_read_and_written(capfd, tmp_path, tiny_trio):
    odd = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"th\xe9ta_b.pth"))
    Path(odd).write_bytes(tiny_trio.b.read_bytes())
    out = tmp_path / "out"
    argv = ["-r", str(tiny_trio.r), "-a", str(tiny_trio.a), "-b", odd, "--json", str(out / "t.json"), "--csv",
            str(out / "t.csv"), "--fig", str(out / "t.png")]
    assert run_cli(cal_transferability.main, argv) == 0
    assert os.fsencode(odd) in (out / "t.csv").read_bytes()
    assert json.loads((out / "t.json").read_text())["results"][0]["finetuned"] == odd
    assert (out / "t.png").stat().st_size > 0


def test_names_longer_than_the_file_system_allows_are_one_line(capsys, tmp_path, tiny_trio):
    long = "n" * 300
    trio = ["-r", str(tiny_trio.r), "-a", str(tiny_trio.a), "-b", str(tiny_trio.b)]
    refused(capsys, cal_transferability.main, [*trio, "--json", str(tmp_path / f"{long}.json")], "--json",
             "longer than the file system allows")
    refused(capsys, cal_transferability.main, ["-r", str(tiny_trio.r), "-a", str(tmp_path / long), "-b",
                                                str(tiny_trio.b)], "longer than the file system allows")
    refused(capsys, finetune.main, ["--dataset", TARGET, *FAST, "-a", str(tiny_trio.a), "-b",
                                     str(tmp_path / f"{long}.pth")], "-b", "longer than the file system allows")
    refused(capsys, analyze.main, ["figure", str(tmp_path / f"{long}.json")], "longer than the file system allows")
    near = tmp_path / ("m" * 250 + ".pth")  # fits, but its run's m...m.last.pth does not
    refused(capsys, finetune.main, ["--dataset", TARGET, *FAST, "-a", str(tiny_trio.a), "-b", str(near)], "-b",
            "longer than the file system allows")
    assert not list(tmp_path.glob("m*"))


@pytest.mark.parametrize("seed", ["4294967296", "99999999999999999999999", "-1"])
def test_a_seed_out_of_range_is_refused_by_every_script(capsys, tmp_path, tiny_trio, seed):
    refused(capsys, finetune.main, ["--dataset", TARGET, *FAST, "-a", str(tiny_trio.a), "-b", str(tmp_path / "b.pth"),
                                     "--seed", seed], "--seed")
    refused(capsys, pretrain_on_ImageNet.main, ["--dataset", "synthetic:source,classes=4,n=8", *FAST, "-r",
                                                 str(tmp_path / "r.pth"), "-a", str(tmp_path / "a.pth"), "--seed", seed],
             "--seed")
    refused(capsys, analyze.main, ["stats", "--dataset", "synthetic:classes=3,n=8", "--features", "pixels",
                                    "--seed", seed], "--seed")
    refused(capsys, finetune.main, ["--dataset", f"synthetic:classes=3,n=8,seed={seed}", *FAST, "-a",
                                     str(tiny_trio.a), "-b", str(tmp_path / "b.pth")], "seed")
    assert list(tmp_path.glob("*.pth")) == []


def test_a_seed_at_the_top_of_the_range_trains(tmp_path, tiny_trio):
    assert run_cli(finetune.main, ["--dataset", TARGET, *FAST, "-a", str(tiny_trio.a), "-b", str(tmp_path / "b.pth"),
                                   "--seed", str(2**32 - 1)]) == 0


@pytest.mark.parametrize("spec", ["classes=3,n=99999999999999", "classes=3,n=8,size=99999999", "classes=3,var=nan"])
def test_a_synthetic_task_too_large_for_memory_is_refused(capsys, tmp_path, tiny_trio, spec):
    refused(capsys, finetune.main, ["--dataset", f"synthetic:{spec}", *FAST, "-a", str(tiny_trio.a), "-b",
                                     str(tmp_path / "b.pth")], f"synthetic:{spec}")


def write_results(path: Path, layers, overall=1.5, label="x") -> Path:
    path.write_text(json.dumps({"results": [{"finetuned": "b.pth", "label": label, "overall": overall,
                                             "layers": [{"transferability": v} for v in layers]}]}))
    return path


@pytest.mark.parametrize("bad", ["abc", [1], {"v": 2}, True])
def test_a_non_numeric_field_of_a_results_json_is_one_line(capsys, tmp_path, bad):
    refused(capsys, analyze.main, ["figure", str(write_results(tmp_path / "r.json", [1.0, bad, 2.0])), "--out",
                                    str(tmp_path / "f.png")], "r.json", "not a number")
    result = write_results(tmp_path / "o.json", [1.0, 2.0], overall=bad, label="synthetic:classes=3,n=8")
    refused(capsys, analyze.main, ["stats", "--dataset", "synthetic:classes=3,n=8", "--features", "pixels",
                                    "--source", "synthetic", "--transferability", str(result)], "o.json", "not a number")
    assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize("label", ["a$b", "$\\frac{", "x_{1}$$", "tw\udcffo"])
def test_labels_are_drawn_as_text_not_mathtext(capfd, tmp_path, tiny_trio, label):
    results = write_results(tmp_path / "r.json", [1.0, 2.0, 3.0], label=label)
    assert run_cli(analyze.main, ["figure", str(results), "--out", str(tmp_path / "f.png")]) == 0
    argv = ["-r", str(tiny_trio.r), "-a", str(tiny_trio.a), "-b", str(tiny_trio.b), "--labels", label, "--fig",
            str(tmp_path / "t.svg")]
    assert run_cli(cal_transferability.main, argv) == 0
    assert "Traceback" not in capfd.readouterr().err


def test_a_deeply_nested_json_is_one_line(capsys, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200000 + "]" * 200000)
    refused(capsys, analyze.main, ["figure", str(deep), "--out", str(tmp_path / "f.png")], "deep.json", "nested")
    refused(capsys, analyze.main, ["stats", "--dataset", "synthetic:classes=3,n=8", "--features", "pixels",
                                    "--source", "synthetic", "--transferability", str(deep)], "deep.json", "nested")


@pytest.mark.parametrize("where", ["weights", "head"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_given_to_the_estimators_are_one_line(capsys, tmp_path, tiny_trio, where, value):
    bad = {k: v.clone() for k, v in tiny_trio.theta_a.items()}
    bad["fc.weight" if where == "head" else "layer2.0.conv1.weight"].view(-1)[3] = value
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    refused(capsys, analyze.main, ["estimators", "--dataset", "synthetic:classes=3,n=8", "-a", str(path)],
             str(path), "NaN or Inf")


@pytest.mark.parametrize("env,needle", [
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE"), ({"WORLD_SIZE": "two"}, "WORLD_SIZE"), ({"WORLD_SIZE": "-3"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "RANK"),
    ({"RANK": "1"}, "RANK"), ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"}, "MASTER_PORT"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "x", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "LOCAL_RANK"),
])
def test_bad_torchrun_variables_are_one_line_naming_the_variable(capsys, tmp_path, tiny_trio, monkeypatch, env,
                                                                  needle):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    refused(capsys, finetune.main, ["--dataset", TARGET, *FAST, "-a", str(tiny_trio.a), "-b", str(tmp_path / "b.pth")],
             needle)
    assert not (tmp_path / "b.pth").exists()


def test_ctrl_c_while_the_script_imports_is_one_line(tmp_path):
    """SIGINT while torch is still being imported: one line and status 130, no traceback."""
    for script in ("cal_transferability.py", "finetune.py", "analyze.py"):
        process = subprocess.Popen([sys.executable, "-X", "importtime", str(REPO / script), "--help"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL) and None)
        # -X importtime writes a line per import: once torch's start, the script is inside its imports
        for line in process.stderr:
            if "torch" in line:
                break
        process.send_signal(signal.SIGINT)
        err = process.stderr.read()
        assert process.wait(timeout=60) == 130, err[-500:]
        lines = [line for line in err.splitlines() if not line.startswith("import time:")]
        assert lines == [f"{script}: interrupted while starting; nothing was read or written"], lines


def test_ctrl_c_during_the_measurement_is_one_line(capsys, monkeypatch, tiny_trio):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cal_transferability, "measure_all", interrupted)
    assert run_cli(cal_transferability.main, ["-r", str(tiny_trio.r), "-a", str(tiny_trio.a), "-b",
                                              str(tiny_trio.b)]) == 130
    assert capsys.readouterr().err.strip().endswith("interrupted")


# ----------------------------------------------------------------------- 6. messages


def test_estimators_name_no_flag_they_do_not_have(capsys, tmp_path):
    unknown = tmp_path / "unknown.pth"
    torch.save({"encoder.weight": torch.randn(4, 4), "classifier.weight": torch.randn(3, 4)}, unknown)
    message = refused(capsys, analyze.main, ["estimators", "--dataset", "synthetic:classes=3,n=8", "-a",
                                              str(unknown)], str(unknown), "cannot infer the architecture")
    parser_flags = {"--dataset", "--data_dir", "-a", "--max_samples", "--k", "--json", "--csv"}
    named = {word.strip(",;()") for word in message.split() if word.startswith("-")}
    assert named <= parser_flags | {"-a"}, named
    assert "arch NAME" not in message


def test_a_link_loop_is_not_reported_as_a_missing_file(capsys, tmp_path, tiny_trio):
    (tmp_path / "x").symlink_to(tmp_path / "y")
    (tmp_path / "y").symlink_to(tmp_path / "x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere.pth")
    refused(capsys, cal_transferability.main, ["-r", str(tmp_path / "x"), "-a", str(tiny_trio.a), "-b",
                                                str(tiny_trio.b)], "loop of symbolic links")
    refused(capsys, finetune.main, ["--dataset", TARGET, *FAST, "-a", str(tiny_trio.a), "-b", str(tmp_path / "b.pth"),
                                     "--resume", str(tmp_path / "x")], "--resume", "loop of symbolic links")
    refused(capsys, analyze.main, ["regress", str(tmp_path / "x")], "loop of symbolic links")
    refused(capsys, cal_transferability.main, ["-r", str(tmp_path / "dangling"), "-a", str(tiny_trio.a), "-b",
                                                str(tiny_trio.b)], "symbolic link to", "does not exist")


def test_a_resumed_run_names_only_weights_files_that_exist(capsys, tmp_path, tiny_trio):
    b = tmp_path / "b.pth"
    assert run_cli(finetune.main, ["--dataset", TARGET, *FAST, "-a", str(tiny_trio.a), "-b", str(b)]) == 0
    capsys.readouterr()
    other = tmp_path / "other.pth"
    assert run_cli(finetune.main, ["--dataset", TARGET, *FAST, "-a", str(tiny_trio.a), "-b", str(other), "--resume",
                                   str(tmp_path / "b.last.pth")]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert not other.exists()
    assert "already finished" in last_line and f"did not write" not in last_line
    assert f"weights in {other}" not in last_line
    assert run_cli(finetune.main, ["--dataset", TARGET, *FAST, "-a", str(tiny_trio.a), "-b", str(b), "--resume",
                                   str(tmp_path / "b.last.pth")]) == 0
    assert f"{b} holds them" in capsys.readouterr().out


def test_a_full_disk_during_training_names_what_is_on_disk(capsys, tmp_path, tiny_trio, monkeypatch):
    """The second epoch's write fails: OUT.pth of epoch 1 exists, so "nothing was written" would be false."""
    import engine.checkpoint as checkpoint

    b = tmp_path / "b.pth"
    calls = {"n": 0}
    original = checkpoint.write_atomically

    def full_after_first_epoch(path, write, mode="wb", unchanged="nothing was written"):
        calls["n"] += 1
        if calls["n"] > 3:  # epoch 1 wrote b.pth, b.last.pth and b.log.jsonl
            def no_space(handle):
                raise OSError(28, "No space left on device")
            return original(path, no_space, mode, unchanged)
        return original(path, write, mode, unchanged)

    monkeypatch.setattr(checkpoint, "write_atomically", full_after_first_epoch)
    message = refused(capsys, finetune.main, ["--dataset", TARGET, *FAST[:-1], "2", "--lr", "1e-9", "-a",
                                               str(tiny_trio.a), "-b", str(b)], "No space left on device")
    assert "nothing was written" not in message
    assert str(b) in message and b.exists()


# --------------------------------------------------------------------- 7. a silent wait


def test_a_process_alone_in_a_distributed_run_says_so_and_stops_after_the_timeout(tmp_path, tiny_trio):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "finetune.py"), "--dataset", TARGET, *FAST, "-a",
                             str(tiny_trio.a), "-b", str(tmp_path / "b.pth"), "--dist_timeout", "3"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"waiting for the other 1 process(es) at 127.0.0.1:{port}" in result.stdout
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "did not join" in err[0] and "--dist_timeout" in err[0], err
    assert time.monotonic() - started < 100
    assert not (tmp_path / "b.pth").exists()

"""pretrain_on_ImageNet.py, finetune.py and the shared loop (engine/, data/loading.py), on tiny synthetic tasks."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import cal_transferability
import data.loading as loading
import engine
import finetune
import pretrain_on_ImageNet
from models import build_model
from utils import UserError, load_state_dict_safely, run_cli

REPO = Path(__file__).resolve().parents[1]
SOURCE = "synthetic:source,classes=6,n=12,n_val=4,size=16"
TARGET = "synthetic:classes=4,n=12,n_val=4,size=16,gap=0.5"
FAST = ["--arch", "resnet20", "--batch_size", "16", "--workers", "0", "--device", "cpu"]


def pretrain(tmp_path: Path, *extra: str, epochs: int = 2) -> tuple[Path, Path]:
    r, a = tmp_path / "r.pth", tmp_path / "a.pth"
    argv = ["--dataset", SOURCE, *FAST, "--max_epoch", str(epochs), "--lr", "0.05", "-r", str(r), "-a", str(a), *extra]
    assert run_cli(pretrain_on_ImageNet.main, argv) == 0
    return r, a


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    return pretrain(tmp_path_factory.mktemp("pretrained"))


def finetune_argv(a: Path, b: Path, *extra: str, epochs: int = 2) -> list[str]:
    return ["--dataset", TARGET, *FAST, "--max_epoch", str(epochs), "-a", str(a), "-b", str(b), *extra]


# ------------------------------------------------------------------------ end to end


def test_pretrain_writes_the_initialisation_it_started_from(pretrained):
    r, a = pretrained
    engine.checkpoint.seed_everything(0)
    expected = build_model("resnet20", num_classes=6).state_dict()
    theta_r, theta_a = load_state_dict_safely(r), load_state_dict_safely(a)
    assert theta_r.keys() == expected.keys()
    assert all(torch.equal(theta_r[k], expected[k]) for k in expected)
    assert not torch.equal(theta_a["layer1.0.conv1.weight"], theta_r["layer1.0.conv1.weight"])
    log = [json.loads(line) for line in (r.parent / "a.log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"} <= log[0].keys()
    assert log[0]["lr"] == 0.05
    checkpoint = torch.load(r.parent / "a.last.pth", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best_acc", "rng", "args"} <= checkpoint.keys()
    assert {"torch", "cuda_by_rank", "numpy", "python"} <= checkpoint["rng"].keys()
    assert checkpoint["epoch"] == 2 and checkpoint["args"]["arch"] == "resnet20"


def test_finetune_then_measure(pretrained, tmp_path, capsys):
    r, a = pretrained
    b = tmp_path / "b.pth"
    assert run_cli(finetune.main, finetune_argv(a, b)) == 0
    theta_b = load_state_dict_safely(b)
    assert theta_b["fc.weight"].shape == (4, 64)  # a new head for the 4 target classes
    log = [json.loads(line) for line in (tmp_path / "b.log.jsonl").read_text().splitlines()]
    best = max(log, key=lambda entry: entry["val_acc"])
    last = torch.load(tmp_path / "b.last.pth", weights_only=True)["model"]
    if best["epoch"] == 2:
        assert all(torch.equal(theta_b[k], last[k]) for k in theta_b)
    assert run_cli(cal_transferability.main, ["-r", str(r), "-a", str(a), "-b", str(b), "--no_fig"]) == 0
    assert "Overall transferability:" in capsys.readouterr().out


def test_finetune_from_scratch_starts_from_theta_r(pretrained, tmp_path):
    r, _ = pretrained
    b = tmp_path / "scratch.pth"
    assert run_cli(finetune.main, ["--dataset", TARGET, *FAST, "--max_epoch", "1", "--from_scratch", str(r), "-b", str(b)]) == 0
    assert load_state_dict_safely(b)["fc.weight"].shape == (4, 64)


def test_load_backbone_takes_everything_but_the_head():
    source = build_model("resnet20", 6).state_dict()
    model = build_model("resnet20", 4)
    head_before = model.fc.weight.clone()
    engine.runs.load_backbone(model, source, "fc", "-a x.pth")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in source if not k.startswith("fc."))
    assert torch.equal(model.fc.weight, head_before)
    del source["layer2.0.conv1.weight"]
    with pytest.raises(UserError, match="layer2.0.conv1.weight is missing"):
        engine.runs.load_backbone(build_model("resnet20", 4), source, "fc", "-a x.pth")


# ------------------------------------------------------------------ sampler and seeds


def test_epoch_sampler_shards_cover_everything_once():
    shards = [list(loading.EpochSampler(10, seed=0, rank=r, world_size=3, shuffle=False)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(10))
    train = [loading.EpochSampler(10, seed=0, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in train] == [4, 4, 4]  # padded, as DistributedSampler
    assert set(i for s in train for i in s) == set(range(10))


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    a, b = loading.EpochSampler(50, seed=1), loading.EpochSampler(50, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1, skip=7)
    assert list(b) == list(a)[7:] and len(b) == 43
    assert list(loading.EpochSampler(50, seed=2)) != list(loading.EpochSampler(50, seed=1))


def test_sample_seeds_follow_the_global_position_in_the_epoch():
    """--augment pil: each sample's seed is fixed by (seed, epoch, position in the epoch's
    order), whichever rank draws it and wherever a resumed epoch starts."""
    single = loading.EpochSampler(10, seed=4, sample_seeds=True)
    single.set_epoch(3)
    pairs = list(single)
    plain = loading.EpochSampler(10, seed=4)
    plain.set_epoch(3)
    assert [index for index, _ in pairs] == list(plain)
    assert [seed for _, seed in pairs] == [loading.step_seed(4, 3, position) for position in range(10)]
    ranks = [loading.EpochSampler(10, seed=4, rank=r, world_size=2, sample_seeds=True) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(3)
    assert [pair for both in zip(*ranks) for pair in both] == pairs  # interleaved: the same (index, seed)s
    ranks[1].set_epoch(3, skip=2)
    assert list(ranks[1]) == pairs[5::2] and len(ranks[1]) == 3
    three = [loading.EpochSampler(10, seed=4, rank=r, world_size=3, sample_seeds=True) for r in range(3)]
    for sampler in three:
        sampler.set_epoch(3)
    padded = [pair for shares in zip(*three) for pair in shares]  # 12: two samples drawn twice
    assert padded[:10] == pairs and [i for i, _ in padded[10:]] == [i for i, _ in pairs[:2]]
    assert len({seed for _, seed in padded}) == 12  # ... augmented differently


def test_step_seeds_differ_by_run_epoch_and_step():
    seeds = {loading.step_seed(s, e, t) for s in range(3) for e in range(3) for t in range(50)}
    assert len(seeds) == 450 and all(0 <= seed < 2**63 for seed in seeds)
    assert loading.step_seed(0, 1, 2) == loading.step_seed(0, 1, 2)


# ------------------------------------------------------------- resume, bit for bit


def run_script(*argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


RESUME_TARGET = "synthetic:classes=4,n=40,n_val=8,size=16,gap=0.3"


def resume_argv(a: Path, b: Path) -> list[str]:
    return ["finetune.py", "--dataset", RESUME_TARGET, "--arch", "resnet20", "--batch_size", "8", "--workers", "2",
            "--device", "cpu", "--max_epoch", "6", "--lr", "0.05", "-a", str(a), "-b", str(b)]


@pytest.fixture(scope="module")
def uninterrupted(pretrained, tmp_path_factory):
    _, a = pretrained
    b = tmp_path_factory.mktemp("uninterrupted") / "b.pth"
    process = run_script(*resume_argv(a, b))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return load_state_dict_safely(b.with_name("b.last.pth")), load_state_dict_safely(b)


def assert_same_weights(x: dict, y: dict) -> None:
    assert x.keys() == y.keys()
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def resume_and_compare(tmp_path, a, b, uninterrupted, *extra: str) -> None:
    """Resume the stopped run whose best weights go to ``b`` and check that it ends with the
    uninterrupted run's (last, best) weights, bit for bit."""
    resumed = run_script(*resume_argv(a, b), *extra, "--resume", str(tmp_path / "b.last.pth"))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed at epoch" in out
    last, best = uninterrupted
    assert_same_weights(load_state_dict_safely(tmp_path / "b.last.pth"), last)
    assert_same_weights(load_state_dict_safely(b), best)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_stopped_and_resumed_run_ends_bit_identical(pretrained, uninterrupted, tmp_path, how):
    _, a = pretrained
    b = tmp_path / "b.pth"
    process = run_script(*resume_argv(a, b))
    wait_for(tmp_path / "b.log.jsonl")  # epoch 1 is done: stop somewhere in epochs 2-6
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.6))
    process.send_signal(how)
    out, err = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal arrived (a very fast machine)")
    if how == signal.SIGTERM:
        assert process.returncode == 128 + signal.SIGTERM, err
        assert "stopped by signal 15" in out and "--resume" in out
        assert "Traceback" not in err
    else:
        assert process.returncode == -signal.SIGKILL
    resume_and_compare(tmp_path, a, b, uninterrupted)
    log = [json.loads(line)["epoch"] for line in (tmp_path / "b.log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------- --augment pil: per-image transforms


PIL_TARGET = "synthetic:classes=4,n=10,n_val=2,size=16,gap=0.5"


def pil_batches(workers: int, epoch: int = 1, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    train, _, _, augment = loading.build_train_val(PIL_TARGET, None, None, 0.0, False, 0, "pil")
    assert augment is None and isinstance(train, loading.SeededSamples)
    sampler = loading.EpochSampler(len(train), seed=5, sample_seeds=True)
    sampler.set_epoch(epoch, skip)
    loader = torch.utils.data.DataLoader(loading.ReportingFailures(train), batch_size=8, sampler=sampler,
                                         num_workers=workers, collate_fn=loading.collate_batch,
                                         generator=torch.Generator().manual_seed(0))  # as fit's loaders
    return [(images, labels) for images, labels, _ in map(loading.unpack_batch, loader)]


def test_pil_augmentation_gives_the_same_batches_with_any_number_of_workers():
    before = torch.get_rng_state()
    in_process = pil_batches(workers=0)
    assert torch.equal(torch.get_rng_state(), before)  # the training process's RNG is left alone
    in_workers = pil_batches(workers=2)
    assert len(in_process) == len(in_workers) == 5
    for (images, labels), (other_images, other_labels) in zip(in_process, in_workers):
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 16)
        assert torch.equal(images, other_images) and torch.equal(labels, other_labels)
    # resuming inside the epoch: the remaining samples are augmented as before
    resumed = pil_batches(workers=2, skip=16)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(in_process[2:], resumed))
    # another epoch draws other crops
    assert not torch.equal(torch.cat([images for images, _ in pil_batches(workers=0, epoch=2)]).sort(0)[0],
                           torch.cat([images for images, _ in in_process]).sort(0)[0])


def test_pil_augmentation_is_the_seeds_per_image_pipeline():
    """A sample is build_transform(True, s) of the data set's image with torch's RNG seeded by
    the sample's seed; not the batch augmentation, and not the evaluation transform."""
    from data import build_dataset
    from data.transforms import build_transform

    train, _, _, _ = loading.build_train_val(PIL_TARGET, None, None, 0.0, False, 0, "pil")
    raw = build_dataset(PIL_TARGET, None, "train")
    image, label = train[(3, 1234)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        expected = build_transform(True, 16)(raw[3][0])
    assert torch.equal(image, expected) and label == raw[3][1]
    assert torch.equal(train[(3, 1234)][0], image) and not torch.equal(train[(3, 1235)][0], image)


def test_pil_augmentation_runs_are_bit_identical_and_cache_only_validation(pretrained, tmp_path, capsys):
    _, a = pretrained
    argv = ["--dataset", PIL_TARGET, "--arch", "resnet20", "--batch_size", "8", "--device", "cpu",
            "--max_epoch", "2", "-a", str(a), "--augment", "pil"]
    assert run_cli(finetune.main, argv + ["--workers", "0", "-b", str(tmp_path / "b.pth")]) == 0
    out = capsys.readouterr().out
    assert "holding the 8 validation images in memory" in out and "--augment pil" in out
    assert run_cli(finetune.main, argv + ["--workers", "0", "-b", str(tmp_path / "c.pth")]) == 0
    assert run_cli(finetune.main, argv + ["--workers", "2", "--cache", "off", "-b", str(tmp_path / "d.pth")]) == 0
    first = load_state_dict_safely(tmp_path / "b.last.pth")
    assert_same_weights(load_state_dict_safely(tmp_path / "c.last.pth"), first)
    assert_same_weights(load_state_dict_safely(tmp_path / "d.last.pth"), first)
    checkpoint = torch.load(tmp_path / "b.last.pth", weights_only=True)
    assert checkpoint["args"]["augment"] == "pil" and checkpoint["args"]["color_jitter"] == 0.0
    # the batch augmentation is another random stream: other weights
    assert run_cli(finetune.main, argv[:-2] + ["--workers", "0", "-b", str(tmp_path / "e.pth")]) == 0
    assert not torch.equal(load_state_dict_safely(tmp_path / "e.last.pth")["fc.weight"], first["fc.weight"])


@pytest.fixture(scope="module")
def uninterrupted_pil(pretrained, tmp_path_factory):
    _, a = pretrained
    b = tmp_path_factory.mktemp("uninterrupted_pil") / "b.pth"
    process = run_script(*resume_argv(a, b), "--augment", "pil")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return load_state_dict_safely(b.with_name("b.last.pth")), load_state_dict_safely(b)


def test_stopped_and_resumed_pil_run_ends_bit_identical(pretrained, uninterrupted_pil, tmp_path):
    """SIGTERM stops inside an epoch: the resumed run must seed the rest of the epoch's
    samples by their positions, in its 2 new worker processes."""
    _, a = pretrained
    b = tmp_path / "b.pth"
    process = run_script(*resume_argv(a, b), "--augment", "pil")
    wait_for(tmp_path / "b.log.jsonl")
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.6))
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal arrived (a very fast machine)")
    assert process.returncode == 128 + signal.SIGTERM, err
    resume_and_compare(tmp_path, a, b, uninterrupted_pil, "--augment", "pil")


# ------------------------------------------------------------------------ torchrun


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_nodes(nodes: int, argv: list[str]) -> str:
    """Run ``argv`` under torchrun as two processes: on one node (``nodes`` 1), or as two
    nodes of one process each, two torchrun launchers on this machine meeting at a local
    port (``nodes`` 2; each launcher sets LOCAL_RANK 0 and LOCAL_WORLD_SIZE 1, as on two
    machines). Returns what all of them printed on their standard output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nodes == 1:
        launchers = [["--standalone", "--nproc_per_node=2"]]
    else:
        port = free_port()
        launchers = [["--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}", "--master_addr=127.0.0.1",
                      f"--master_port={port}"] for node in range(2)]
    processes = [run_script("-m", "torch.distributed.run", *launcher, *argv, env=env) for launcher in launchers]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    return "".join(out for out, _ in outputs)


def torchrun_training(a: Path, out_dir: Path, script: str, nodes: int) -> dict:
    """One epoch of ``script`` as two processes on ``nodes`` nodes (:func:`torchrun_nodes`);
    checks that only the first process printed and wrote, and returns the weights written."""
    out_dir.mkdir()
    if script == "pretrain_on_ImageNet.py":
        args = ["--dataset", SOURCE, "-r", str(out_dir / "r.pth"), "-a", str(out_dir / "x.pth")]
    else:
        args = ["--dataset", TARGET, "-a", str(a), "-b", str(out_dir / "x.pth")]
    out = torchrun_nodes(nodes, [script, *args, "--arch", "resnet20", "--batch_size", "8", "--workers", "0",
                                 "--device", "cpu", "--max_epoch", "1"])
    assert out.count("epoch 1/1") == 1, out  # only rank 0 prints, whichever node the others are on
    expected = {"x.pth", "x.last.pth", "x.log.jsonl"} | ({"r.pth"} if script.startswith("pretrain") else set())
    assert {p.name for p in out_dir.iterdir()} == expected  # only rank 0 writes, nothing else is left
    log = [json.loads(line) for line in (out_dir / "x.log.jsonl").read_text().splitlines()]
    assert len(log) == 1
    return load_state_dict_safely(out_dir / "x.pth")


@pytest.mark.parametrize("script", ["pretrain_on_ImageNet.py", "finetune.py"])
def test_torchrun_two_processes_on_cpu(pretrained, tmp_path, script):
    torchrun_training(pretrained[1], tmp_path / "out", script, nodes=1)


def test_two_nodes_of_one_process_train_as_one_node_of_two(pretrained, tmp_path):
    """Two torchrun launchers (each process the first of its node) on gloo: the same
    printing, files and weights as one launcher of two processes."""
    two_nodes = torchrun_training(pretrained[1], tmp_path / "nodes", "finetune.py", nodes=2)
    assert_same_weights(two_nodes, torchrun_training(pretrained[1], tmp_path / "node", "finetune.py", nodes=1))


# ------------------------------------------------------------------------ bad input


def expect_error(capsys, main, argv, *needles: str) -> str:
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "error:" in err[-1] and "Traceback" not in "\n".join(err)
    for needle in needles:
        assert needle in err[-1], err[-1]
    return err[-1]


def test_missing_or_wrong_data_dir(capsys, tmp_path, pretrained):
    _, a = pretrained
    missing = tmp_path / "nowhere"
    expect_error(capsys, finetune.main, ["--dataset", "cifar10", "--data_dir", str(missing), "-a", str(a),
                                         "-b", str(tmp_path / "b.pth")], str(missing))
    expect_error(capsys, finetune.main, ["--dataset", "CUB-200", "--data_dir", str(tmp_path), "-a", str(a),
                                         "-b", str(tmp_path / "b.pth")], "CUB_200_2011")
    assert not (tmp_path / "b.pth").exists()


def test_unknown_dataset_and_arch(capsys, tmp_path, pretrained):
    _, a = pretrained
    expect_error(capsys, finetune.main, ["--dataset", "mnist", "-a", str(a), "-b", str(tmp_path / "b.pth")], "mnist")
    expect_error(capsys, pretrain_on_ImageNet.main, ["--arch", "alexnet", "--dataset", SOURCE], "--arch")


def test_pretrained_of_another_architecture(capsys, tmp_path, pretrained):
    _, a = pretrained
    expect_error(capsys, finetune.main, finetune_argv(a, tmp_path / "b.pth") + ["--arch", "resnet32"],
                 str(a), "resnet32")


def test_existing_outputs_are_not_overwritten(capsys, tmp_path, pretrained):
    _, a = pretrained
    b = tmp_path / "b.pth"
    b.write_text("precious")
    expect_error(capsys, finetune.main, finetune_argv(a, b, epochs=1), str(b), "--overwrite")
    assert b.read_text() == "precious"
    (tmp_path / "c.last.pth").write_text("precious")
    expect_error(capsys, finetune.main, finetune_argv(a, tmp_path / "c.pth", epochs=1), "c.last.pth")
    assert run_cli(finetune.main, finetune_argv(a, b, "--overwrite", epochs=1)) == 0
    assert "fc.weight" in load_state_dict_safely(b)
    r = tmp_path / "r.pth"
    r.write_text("precious")
    expect_error(capsys, pretrain_on_ImageNet.main, ["--dataset", SOURCE, *FAST, "-r", str(r), "-a", str(tmp_path / "x.pth")],
                 str(r))
    assert r.read_text() == "precious"


def write_image_folder(root: Path, classes: dict[str, int]) -> None:
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (12, 12), (i * 20 % 255, 80, 160)).save(root / name / f"{i}.png")


def test_corrupt_image_is_named_or_skipped(capsys, tmp_path, pretrained):
    _, a = pretrained
    data = tmp_path / "data"
    write_image_folder(data, {"cat": 10, "dog": 10})
    bad = data / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    argv = ["--dataset", "imagefolder", "--data_dir", str(data), "--arch", "resnet20", "--img_size", "16",
            "--batch_size", "4", "--workers", "2", "--device", "cpu", "--max_epoch", "1", "-a", str(a)]
    expect_error(capsys, finetune.main, argv + ["-b", str(tmp_path / "b.pth")], str(bad))
    assert not (tmp_path / "b.pth").exists()
    assert run_cli(finetune.main, argv + ["-b", str(tmp_path / "c.pth"), "--skip_corrupt"]) == 0
    (entry,) = [json.loads(line) for line in (tmp_path / "c.log.jsonl").read_text().splitlines()]
    in_train = bad.as_posix() in [p for p, _ in engine_train_samples(data)]
    assert entry["skipped_images"] == (1 if in_train else 0)
    assert "1 corrupt image skipped in training" in capsys.readouterr().out or not in_train


def engine_train_samples(data: Path):
    from data import build_dataset

    return build_dataset("imagefolder", data, "train").samples


def test_empty_class_folder(capsys, tmp_path, pretrained):
    _, a = pretrained
    data = tmp_path / "data"
    write_image_folder(data, {"cat": 5, "dog": 0})
    expect_error(capsys, finetune.main, ["--dataset", "imagefolder", "--data_dir", str(data), *FAST, "-a", str(a),
                                         "-b", str(tmp_path / "b.pth")], "dog")


def test_resume_from_another_architecture_or_dataset(capsys, tmp_path, pretrained):
    _, a = pretrained
    b = tmp_path / "b.pth"
    assert run_cli(finetune.main, finetune_argv(a, b, epochs=1)) == 0
    last = str(tmp_path / "b.last.pth")
    other_data = finetune_argv(a, b, "--resume", last, epochs=2)
    other_data[other_data.index(TARGET)] = "synthetic:classes=4,n=12,n_val=4,size=16,gap=0.9"
    expect_error(capsys, finetune.main, other_data, "--dataset")
    r32 = tmp_path / "r32.pth"
    torch.save(build_model("resnet32", 6).state_dict(), r32)
    other_arch = ["--dataset", TARGET, *FAST, "--max_epoch", "2", "-b", str(b), "--resume", last,
                  "--from_scratch", str(r32)]
    other_arch[other_arch.index("resnet20")] = "resnet32"
    expect_error(capsys, finetune.main, other_arch, "--arch")
    expect_error(capsys, finetune.main, finetune_argv(a, b, "--resume", str(a), epochs=2), str(a))
    # another training augmentation
    expect_error(capsys, finetune.main, finetune_argv(a, b, "--resume", last, "--augment", "pil", epochs=2),
                 "--augment batch", "not pil")
    expect_error(capsys, finetune.main, finetune_argv(a, b, "--resume", last, "--color_jitter", "0.4", epochs=2),
                 "--color_jitter 0.0", "not 0.4")
    # a checkpoint of an older version, which did not record them
    old = torch.load(last, weights_only=True)
    del old["args"]["augment"], old["args"]["color_jitter"]
    torch.save(old, tmp_path / "old.last.pth")
    expect_error(capsys, finetune.main, finetune_argv(a, b, "--resume", str(tmp_path / "old.last.pth"), epochs=2),
                 "older version", "--augment")


def test_diverging_loss_stops_and_keeps_the_files(capsys, tmp_path, pretrained):
    _, a = pretrained
    b = tmp_path / "b.pth"
    b.write_text("last good")
    message = expect_error(capsys, finetune.main, finetune_argv(a, b, "--overwrite", "--lr", "1e30", epochs=2),
                           "epoch 1 step")
    assert "nan" in message.lower() or "inf" in message.lower()
    assert b.read_text() == "last good"
    # no epoch finished: no .last.pth is named (none exists), and --amp off is not suggested when it was off
    assert "no epoch had finished" in message and ".last.pth" not in message and "--amp off" not in message
    message = expect_error(capsys, finetune.main, finetune_argv(a, b, "--overwrite", "--lr", "1e30", "--amp", "bf16",
                                                                epochs=2), "epoch 1 step")
    assert "--amp off (it was bf16)" in message


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs_on_the_cpu(pretrained, tmp_path, amp):
    _, a = pretrained
    b = tmp_path / "b.pth"
    assert run_cli(finetune.main, finetune_argv(a, b, "--amp", amp, epochs=1)) == 0
    theta_b = load_state_dict_safely(b)
    assert all(t.dtype == torch.float32 for k, t in theta_b.items() if t.is_floating_point())  # fp32 weights
    checkpoint = torch.load(tmp_path / "b.last.pth", weights_only=True)
    assert (checkpoint["scaler"] is not None) == (amp == "fp16")


def test_channels_last_is_the_same_computation(pretrained, tmp_path):
    """The memory layout changes how convolutions are computed, not what: after an epoch the
    weights agree to float rounding."""
    _, a = pretrained
    assert run_cli(finetune.main, finetune_argv(a, tmp_path / "nchw.pth", "--no-channels_last", epochs=1)) == 0
    assert run_cli(finetune.main, finetune_argv(a, tmp_path / "nhwc.pth", "--channels_last", epochs=1)) == 0
    nchw = torch.load(tmp_path / "nchw.last.pth", weights_only=True)["model"]
    nhwc = torch.load(tmp_path / "nhwc.last.pth", weights_only=True)["model"]
    for key, tensor in nchw.items():
        # float rounding differs between the layouts' convolution kernels; after an epoch of
        # SGD through BatchNorm it stays far below the weights' own scale
        scale = tensor.float().abs().max().item()
        assert (tensor.float() - nhwc[key].float()).abs().max().item() <= 1e-3 * scale + 1e-5, key


@pytest.mark.slow
def test_compiled_model_trains(pretrained, tmp_path):
    _, a = pretrained
    assert run_cli(finetune.main, finetune_argv(a, tmp_path / "b.pth", "--compile", epochs=1)) == 0
    assert "fc.weight" in load_state_dict_safely(tmp_path / "b.pth")


def test_compile_mode_needs_compile(capsys, tmp_path, pretrained):
    _, a = pretrained
    b = tmp_path / "b.pth"
    expect_error(capsys, finetune.main, finetune_argv(a, b, "--compile_mode", "reduce-overhead"),
                 "--compile_mode reduce-overhead", "add --compile")
    assert list(tmp_path.iterdir()) == []


def test_norm_weight_decay_puts_normalisation_parameters_in_their_own_group():
    """--norm_weight_decay (as torchvision's reference scripts): BatchNorm's scales and shifts
    decay at their own rate, every other parameter at --weight_decay; without it, one group."""
    from engine import TrainSettings
    from engine.optim import parameter_groups
    from models import build_model

    model = build_model("resnet20", num_classes=5)
    assert len(parameter_groups(model, TrainSettings(epochs=1, batch_size=1, lr=0.1, weight_decay=1e-2))) == 1
    settings = TrainSettings(epochs=1, batch_size=1, lr=0.1, weight_decay=1e-2, norm_weight_decay=1e-4)
    others, norms = parameter_groups(model, settings)
    names = {id(p): name for name, p in model.named_parameters()}
    assert norms["weight_decay"] == 1e-4 and "weight_decay" not in others  # the optimizer's default: 1e-2
    norm_names = {name for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)}
    assert {names[id(p)] for p in norms["params"]} == {n for n in names.values() if n.rpartition(".")[0] in norm_names}
    assert "layer3.0.downsample.1.weight" in {names[id(p)] for p in norms["params"]}  # a shortcut's BatchNorm too
    assert len(others["params"]) + len(norms["params"]) == len(list(model.parameters()))
    # one SGD step on zero gradients: only the decay moves the weights, each group at its rate
    optimizer = torch.optim.SGD(parameter_groups(model, settings), lr=0.1, weight_decay=1e-2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["conv1.weight"], before["conv1.weight"] * (1 - 0.1 * 1e-2))
    assert torch.allclose(after["bn1.weight"], before["bn1.weight"] * (1 - 0.1 * 1e-4))


# ------------------------------------------------------------ fixed input sizes (ViT)

VIT_TARGET = "synthetic:classes=2,n=2,n_val=1,size=32"  # a 32-px task: a ViT must see it at 224 px
VIT_REFUSAL = "--img_size 32: vit_s16 takes 224-px images only; leave --img_size out or give 224"


@pytest.fixture(scope="module")
def vit_start(tmp_path_factory) -> Path:
    a = tmp_path_factory.mktemp("vit") / "vit_a.pth"
    torch.manual_seed(0)
    torch.save(build_model("vit_s16", num_classes=3).state_dict(), a)
    return a


def test_input_size_is_the_architectures_fixed_size_else_the_data_sets():
    assert engine.runs.input_size("vit_s16", None, VIT_TARGET) == 224
    assert engine.runs.input_size("vit_b16", 224, "cifar10") == 224
    assert engine.runs.input_size("resnet20", None, VIT_TARGET) == 32
    assert engine.runs.input_size("resnet50", 48, "cifar10") == 48
    assert engine.runs.input_size(None, None, "cifar10") == 32
    with pytest.raises(UserError, match="--img_size 32: vit_s16 takes 224-px images only"):
        engine.runs.input_size("vit_s16", 32, "cifar10")


def test_vit_finetunes_at_its_input_size_on_a_32_px_data_set(vit_start, tmp_path):
    """The ViT failed at its first step (torchvision's assertion: 32-px images, 224 wanted)."""
    b = tmp_path / "b.pth"
    argv = ["--dataset", VIT_TARGET, "--batch_size", "4", "--workers", "0", "--device", "cpu", "--max_epoch", "1",
            "-a", str(vit_start), "-b", str(b)]
    assert run_cli(finetune.main, argv) == 0
    assert load_state_dict_safely(b)["heads.head.weight"].shape == (2, 384)
    assert torch.load(tmp_path / "b.last.pth", weights_only=True)["args"]["img_size"] == 224


@pytest.mark.parametrize("script", ["finetune", "pretrain"])
def test_vit_refuses_another_img_size_before_reading_or_writing(vit_start, tmp_path, capsys, monkeypatch, script):
    def no_data(*args, **kwargs):
        raise AssertionError("the data were opened before --img_size was checked")

    monkeypatch.setattr(engine.runs, "build_train_val", no_data)
    common = ["--dataset", VIT_TARGET, "--img_size", "32", "--workers", "0", "--device", "cpu", "--max_epoch", "1"]
    if script == "finetune":
        argv = [*common, "-a", str(vit_start), "-b", str(tmp_path / "b.pth")]
        expect_error(capsys, finetune.main, argv, VIT_REFUSAL)
        argv = [*common, "--from_scratch", str(vit_start), "-b", str(tmp_path / "b.pth")]
        expect_error(capsys, finetune.main, argv, VIT_REFUSAL)
    else:
        argv = [*common, "--arch", "vit_s16", "-r", str(tmp_path / "r.pth"), "-a", str(tmp_path / "a.pth")]
        expect_error(capsys, pretrain_on_ImageNet.main, argv, VIT_REFUSAL)
    assert list(tmp_path.iterdir()) == []


def test_a_second_run_on_the_same_outputs_is_refused_and_a_dead_runs_lock_is_not(capsys, tmp_path, pretrained):
    """Two runs with the same -b would mix their files: while one holds the lock of OUT.pth
    (.OUT.pth.lock) the other is refused with one line naming the holder; a lock file left by a
    process that died (no flock held) does not block; the lock files are gone after a run."""
    import os

    from engine.checkpoint import RunLock

    _, a = pretrained
    b = tmp_path / "b.pth"
    holder = RunLock({b: "-b"})
    holder.acquire()
    try:
        message = expect_error(capsys, finetune.main, finetune_argv(a, b, epochs=1), "another run is writing",
                               f"pid {os.getpid()}")
        assert "-b" in message
        assert not b.exists() and not (tmp_path / "b.last.pth").exists()
    finally:
        holder.release()
    (tmp_path / ".b.pth.lock").write_text("pid 999999 on elsewhere, started long ago")  # a dead run's lock
    assert run_cli(finetune.main, finetune_argv(a, b, epochs=1)) == 0
    assert b.exists() and not list(tmp_path.glob(".*.lock"))


def test_resume_with_another_schedule_batch_size_seed_or_process_count_is_refused(capsys, tmp_path, pretrained):
    _, a = pretrained
    b = tmp_path / "b.pth"
    assert run_cli(finetune.main, finetune_argv(a, b, epochs=1)) == 0
    last = str(tmp_path / "b.last.pth")
    for flag, value, recorded in (("--max_epoch", "3", "1"), ("--lr", "0.5", "0.01"), ("--seed", "7", "0"),
                                  ("--weight_decay", "0.001", "0.0001")):
        argv = finetune_argv(a, b, "--resume", last, epochs=1)
        argv += [flag, value]
        expect_error(capsys, finetune.main, argv, f"{flag} {recorded}", f"not {value}")
    other_batch = finetune_argv(a, b, "--resume", last, epochs=1)
    other_batch[other_batch.index("--batch_size") + 1] = "8"
    expect_error(capsys, finetune.main, other_batch, "--batch_size 16", "not 8")
    assert torch.load(last, weights_only=True)["args"]["world_size"] == 1
    two = torch.load(last, weights_only=True)
    two["args"]["world_size"] = 2
    torch.save(two, tmp_path / "two.last.pth")
    expect_error(capsys, finetune.main, finetune_argv(a, b, "--resume", str(tmp_path / "two.last.pth"), epochs=1),
                 "2 process(es), not 1")
    assert run_cli(finetune.main, finetune_argv(a, b, "--resume", last, epochs=1)) == 0  # the same settings resume


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_one_file_for_two_roles_is_refused_before_anything_is_written(capsys, tmp_path, pretrained):
    _, a = pretrained
    start = tmp_path / "theta_a.pth"
    start.write_bytes(a.read_bytes())
    os.symlink(start, tmp_path / "link.pth")
    os.link(start, tmp_path / "hard.pth")
    before = snapshot(tmp_path)
    for b in (start, tmp_path / "link.pth", tmp_path / "hard.pth"):
        line = expect_error(capsys, finetune.main, finetune_argv(start, b, "--overwrite", epochs=1), "-a", "-b",
                            "same file")
        assert str(b) in line
    expect_error(capsys, finetune.main, ["--dataset", TARGET, *FAST, "--max_epoch", "1", "--from_scratch",
                                         str(start), "-b", str(tmp_path / "link.pth"), "--overwrite"],
                 "--from_scratch", "-b", "same file")
    # -a X.last.pth is the .last.pth that -b X would write
    last = tmp_path / "x.last.pth"
    last.write_bytes(a.read_bytes())
    expect_error(capsys, finetune.main, finetune_argv(last, tmp_path / "x.pth", "--overwrite", epochs=1),
                 "x.last.pth", "same file")
    for r, theta_a in ((tmp_path / "same.pth", tmp_path / "same.pth"), (tmp_path / "new_r.pth", tmp_path / "sub/../new_r.pth"),
                       (tmp_path / "p.last.pth", tmp_path / "p.pth"), (tmp_path / "link.pth", start)):
        expect_error(capsys, pretrain_on_ImageNet.main, ["--dataset", SOURCE, *FAST, "--max_epoch", "1",
                                                         "-r", str(r), "-a", str(theta_a), "--overwrite"],
                     "-r", "-a", "same file")
    assert snapshot(tmp_path) == {**before, "x.last.pth": a.read_bytes()}


def test_a_finished_run_resumed_says_so_and_rewrites_nothing(capsys, tmp_path, pretrained):
    _, a = pretrained
    b = tmp_path / "b.pth"
    assert run_cli(finetune.main, finetune_argv(a, b, epochs=1)) == 0
    last = tmp_path / "b.last.pth"
    files = [b, last, tmp_path / "b.log.jsonl"]
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in files}
    capsys.readouterr()
    assert run_cli(finetune.main, finetune_argv(a, b, "--resume", str(last), epochs=1)) == 0
    out = capsys.readouterr().out
    assert f"the run in {last} is finished (1 of 1 epochs); nothing to do" in out
    assert "resumed at epoch" not in out and "epoch 2/1" not in out and "holding the" not in out
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in files} == before


def test_corrupt_validation_images_are_counted_apart(capsys, tmp_path, pretrained):
    _, a = pretrained
    data = tmp_path / "data"
    write_image_folder(data, {"cat": 10, "dog": 10})
    from data import build_dataset

    val = [path for path, _ in build_dataset("imagefolder", data, "val").samples]
    Path(val[0]).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (12, 12)).save(data / "cat" / "moving.gif")  # not read: one notice says so
    argv = ["--dataset", "imagefolder", "--data_dir", str(data), "--arch", "resnet20", "--img_size", "16",
            "--batch_size", "4", "--workers", "0", "--device", "cpu", "--max_epoch", "1", "-a", str(a),
            "--skip_corrupt"]
    for cache in ("on", "off"):
        b = tmp_path / f"{cache}.pth"
        assert run_cli(finetune.main, argv + ["--cache", cache, "-b", str(b)]) == 0
        out = capsys.readouterr().out
        (entry,) = [json.loads(line) for line in (tmp_path / f"{cache}.log.jsonl").read_text().splitlines()]
        assert entry["skipped_images"] == 0 and entry["skipped_val_images"] == 1
        assert list(entry)[-1] == "skipped_val_images"  # the earlier keys keep their order
        assert "(1 corrupt image left out of validation)" in out
        assert out.count("ignored 1 file of other types in the class folders (.gif; e.g. ") == 1
        if cache == "on":  # only the readable images are held
            assert "holding the 16 training and 3 validation images in memory" in out


def test_epoch_line_counts_one_corrupt_image_in_the_singular():
    entry = {"epoch": 1, "train_loss": 1.0, "train_acc": 50.0, "val_loss": 1.0, "val_acc": 50.0, "lr": 0.1,
             "images_per_s": 10.0, "skipped_images": 1, "overflow_steps": 0, "skipped_val_images": 2}
    line = engine.loop.epoch_line(entry, 3, False)
    assert line.endswith("(1 corrupt image skipped in training; 2 corrupt images left out of validation)")
    assert "corrupt" not in engine.loop.epoch_line({**entry, "skipped_images": 0, "skipped_val_images": 0}, 3, False)

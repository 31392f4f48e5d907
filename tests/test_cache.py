"""Decoded images in memory (data/cache.py, --cache): same batches, same weights, same errors."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

import data.loading as loading
import engine
from engine.processes import join_process_group
import finetune
from data import build_dataset, build_transform
from data.cache import AUTO_MEMORY_SHARE, ImageCache, should_cache
from data.transforms import build_loading_transform, normalize_batch
from tests.test_training import FAST, assert_same_weights, expect_error, finetune_argv, pretrain
from utils import load_state_dict_safely, run_cli


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return pretrain(tmp_path_factory.mktemp("pretrained"), epochs=1)


def test_batch_normalisation_equals_the_evaluation_transform():
    images = torch.randint(0, 256, (6, 3, 19, 23), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    per_image = torch.stack([build_transform(False, 14)(image) for image in images])
    resized = torch.stack([build_loading_transform(14)(image) for image in images])
    assert resized.dtype == torch.uint8
    assert torch.equal(normalize_batch(resized), per_image)  # bit for bit, not just close


def test_auto_caches_what_fits_a_quarter_of_free_memory():
    gib = 2**30
    assert should_cache("on", 100 * gib, available=gib) and not should_cache("off", 1, available=100 * gib)
    assert should_cache("auto", int(AUTO_MEMORY_SHARE * 8 * gib), available=8 * gib)
    assert not should_cache("auto", int(AUTO_MEMORY_SHARE * 8 * gib) + 1, available=8 * gib)
    # the processes of a node share its memory
    assert should_cache("auto", gib // 2, processes=4, available=8 * gib)
    assert not should_cache("auto", gib // 2, processes=5, available=8 * gib)
    assert not should_cache("auto", 1, available=None)  # unknown: do not risk it
    with pytest.raises(ValueError):
        should_cache("always", 1)


def make_samples(count: int, skipped: set[int]):
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (count, 3, 5, 5), dtype=torch.uint8, generator=generator)
    return [None if i in skipped else (images[i], i % 3) for i in range(count)]


def test_cache_gives_the_data_loaders_batches():
    samples = make_samples(23, skipped={4, 5, 17})
    cache = ImageCache.from_samples(iter(samples), len(samples))
    assert cache.nbytes == 23 * 3 * 5 * 5 and cache.loaded.sum() == 20
    sampler = loading.EpochSampler(len(samples), seed=3)
    sampler.set_epoch(2)
    loader = torch.utils.data.DataLoader(samples, batch_size=8, sampler=sampler, collate_fn=loading.collate_batch)
    cached = loading.CachedLoader(cache, sampler, batch_size=8, pin_memory=False)
    assert len(cached) == len(loader) == 3
    pairs = list(zip(loader, cached, strict=True))
    for (images, labels, skipped), (c_images, c_labels, c_skipped) in pairs:
        assert torch.equal(images, c_images) and torch.equal(labels, c_labels) and skipped == c_skipped
        assert c_labels.dtype == torch.long
    assert sum(batch[2] for _, batch in pairs) == 3
    # a batch of skipped images only is empty, as the loader's
    images, labels, skipped = cache.batch([4, 17])
    assert len(labels) == 0 and len(images) == 0 and skipped == 2


def test_samples_that_cannot_be_cached_are_left_to_the_loader():
    assert ImageCache.from_samples(iter([(torch.zeros(3, 4, 4), 0)]), 1) is None  # float, already normalised
    mixed = [(torch.zeros(3, 4, 4, dtype=torch.uint8), 0), (torch.zeros(3, 5, 4, dtype=torch.uint8), 1)]
    assert ImageCache.from_samples(iter(mixed), 2) is None  # not resized to one size
    everything_skipped = ImageCache.from_samples(iter([None, None]), 2)
    assert everything_skipped.batch([0, 1])[2] == 2
    with pytest.raises(ValueError, match="1 of its 2"):
        ImageCache.from_samples(iter(mixed[:1]), 2)


def test_training_with_and_without_the_cache_is_bit_identical(pretrained, tmp_path, capsys):
    _, a = pretrained
    assert run_cli(finetune.main, finetune_argv(a, tmp_path / "on.pth", "--cache", "on")) == 0
    assert "images in memory" in capsys.readouterr().out
    assert run_cli(finetune.main, finetune_argv(a, tmp_path / "off.pth", "--cache", "off")) == 0
    assert "images in memory" not in capsys.readouterr().out
    on = torch.load(tmp_path / "on.last.pth", weights_only=True)
    off = torch.load(tmp_path / "off.last.pth", weights_only=True)
    assert_same_weights(on["model"], off["model"])
    assert_same_weights(load_state_dict_safely(tmp_path / "on.pth"), load_state_dict_safely(tmp_path / "off.pth"))
    keep = ("train_loss", "train_acc", "val_loss", "val_acc", "skipped_images")
    assert [{k: e[k] for k in keep} for e in on["history"]] == [{k: e[k] for k in keep} for e in off["history"]]


def write_folder_with_a_corrupt_image(root: Path) -> Path:
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (12 + i, 12), (i * 20, 80, 160 if name == "cat" else 40)).save(root / name / f"{i}.png")
    bad = root / "dog" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return bad


@pytest.mark.parametrize("workers", ["0", "2"])
def test_corrupt_images_are_named_or_skipped_alike(pretrained, tmp_path, capsys, workers):
    _, a = pretrained
    data = tmp_path / "data"
    bad = write_folder_with_a_corrupt_image(data)
    argv = ["--dataset", "imagefolder", "--data_dir", str(data), "--arch", "resnet20", "--img_size", "12",
            "--batch_size", "4", "--workers", workers, "--device", "cpu", "--max_epoch", "2", "-a", str(a)]
    for cache in ("on", "off"):
        expect_error(capsys, finetune.main, argv + ["--cache", cache, "-b", str(tmp_path / f"x{cache}.pth")], str(bad))
        assert not list(tmp_path.glob("x*"))
    logs = {}
    for cache in ("on", "off"):
        b = tmp_path / f"{cache}.pth"
        assert run_cli(finetune.main, argv + ["--cache", cache, "--skip_corrupt", "-b", str(b)]) == 0
        logs[cache] = [json.loads(line) for line in (tmp_path / f"{cache}.log.jsonl").read_text().splitlines()]
    assert_same_weights(load_state_dict_safely(tmp_path / "on.pth"), load_state_dict_safely(tmp_path / "off.pth"))
    in_train = str(bad) in [path for path, _ in build_dataset("imagefolder", data, "train").samples]
    for cache in ("on", "off"):
        assert [entry["skipped_images"] for entry in logs[cache]] == [int(in_train)] * 2
        assert [entry["val_acc"] for entry in logs[cache]] == [entry["val_acc"] for entry in logs["on"]]


def test_auto_uses_the_disk_cache_when_memory_is_short(pretrained, tmp_path, capsys, monkeypatch):
    import data.cache

    _, a = pretrained
    monkeypatch.setattr(data.cache, "available_memory", lambda: 1000)
    cache_dir = tmp_path / "images"
    assert run_cli(finetune.main, finetune_argv(a, tmp_path / "b.pth", "--cache_dir", str(cache_dir), epochs=1)) == 0
    out = capsys.readouterr().out
    assert "images in memory" not in out and f"in {cache_dir} (memory-mapped)" in out
    monkeypatch.setattr(data.cache, "available_memory", lambda: 2**34)
    assert run_cli(finetune.main, finetune_argv(a, tmp_path / "c.pth", epochs=1)) == 0
    assert "images in memory" in capsys.readouterr().out


def test_cache_flag_is_checked(capsys, tmp_path):
    assert run_cli(finetune.main, ["--cache", "always", "-a", "x.pth", "-b", str(tmp_path / "b.pth"), *FAST]) == 2
    assert "--cache" in capsys.readouterr().err


class SignalsWhileRead(torch.utils.data.Dataset):
    """uint8 images; reading image 5 sends this process SIGTERM, as a user's Ctrl-C would."""

    classes = ["a", "b"]

    def __len__(self) -> int:
        return 100

    def __getitem__(self, index: int):
        if index == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.full((3, 8, 8), index, dtype=torch.uint8), index % 2


def test_a_signal_while_caching_stops_before_anything_is_written(tmp_path):
    from data.transforms import BatchAugment
    from models import build_model

    settings = engine.TrainSettings(epochs=1, batch_size=16, lr=0.01, weight_decay=0.0, workers=0, cache="on")
    said = []
    result = engine.fit(build_model("resnet20", 2), SignalsWhileRead(), SignalsWhileRead(), settings,
                        join_process_group("cpu"), tmp_path / "b.pth", announce=said.append, augment=BatchAugment(8))
    assert result.stopped_by == signal.SIGTERM and result.history == []
    assert "stopped by signal 15 while reading the images" in said[-1]
    assert list(tmp_path.iterdir()) == []


def test_the_cache_line_says_what_cache_off_would_do(pretrained, tmp_path, capsys):
    _, a = pretrained
    assert run_cli(finetune.main, finetune_argv(a, tmp_path / "b.pth", "--cache", "on", epochs=1)) == 0
    out = capsys.readouterr().out
    assert "holding the 48 training and 16 validation images in memory" in out
    assert "--cache off prepares them again every epoch)" in out and "reads the files" not in out  # no files
    data = tmp_path / "data"
    write_folder_with_a_corrupt_image(data)
    argv = ["--dataset", "imagefolder", "--data_dir", str(data), "--arch", "resnet20", "--img_size", "12",
            "--batch_size", "4", "--workers", "0", "--device", "cpu", "--max_epoch", "1", "-a", str(a),
            "--cache", "on", "--skip_corrupt", "-b", str(tmp_path / "c.pth")]
    assert run_cli(finetune.main, argv) == 0
    out = capsys.readouterr().out
    assert "holding the 16 training and 3 validation images in memory" in out or \
        "holding the 15 training and 4 validation images in memory" in out  # the corrupt one is not held
    assert "--cache off reads the files every epoch)" in out

"""Decoded images on disk (--cache disk, data/cache.py StoredImages) and one decode per node under
torchrun: the memory cache's batches, reused without decoding, rebuilt when a source file
changes, nothing half-written ever read, bit-identical training, one-line errors."""
from __future__ import annotations

import errno
import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import data.cache
import data.datasets
import data.loading as loading
import engine
import finetune
from data.cache import AUTO_DISK_SHARE, DEFAULT_CACHE_DIR, ImageCache, StoredImages, cache_kind
from tests.test_cache import make_samples
from tests.test_training import REPO, assert_same_weights, expect_error, finetune_argv, pretrain, torchrun_nodes
from utils import load_state_dict_safely, run_cli


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return pretrain(tmp_path_factory.mktemp("pretrained"), epochs=1)


def fill_from(samples, fail_at: int | None = None):
    """A ``fill(allocate)`` over ``samples``, raising at sample ``fail_at`` (a failing build)."""
    def produce():
        for index, sample in enumerate(samples):
            if index == fail_at:
                raise RuntimeError("the build fails")
            yield sample

    return lambda allocate: ImageCache.from_samples(produce(), len(samples), allocate)


def batches(cache, seed: int = 3):
    sampler = loading.EpochSampler(len(cache), seed=seed)
    sampler.set_epoch(1)
    return list(loading.CachedLoader(cache, sampler, batch_size=8, pin_memory=False))


def test_disk_cache_gives_the_memory_caches_batches(tmp_path):
    samples = make_samples(23, skipped={4, 17})
    in_memory = ImageCache.from_samples(iter(samples), len(samples))
    entry = StoredImages(tmp_path, "x", {"what": "test"})
    on_disk = entry.build(fill_from(samples))
    assert sorted(p.name for p in entry.folder.iterdir()) == ["images.u8", "labels.pt", "manifest.json"]
    assert (entry.folder / "images.u8").stat().st_size == in_memory.nbytes
    assert json.loads((entry.folder / "manifest.json").read_text())["skipped"] == 2
    reopened = StoredImages(tmp_path, "x", {"what": "test"}, allow_skipped=True).open()
    assert StoredImages(tmp_path, "x", {"what": "test"}).open() is None  # skipped images, not allowed here
    assert StoredImages(tmp_path, "x", {"what": "else"}, allow_skipped=True).open() is None  # another key
    for cache in (on_disk, reopened):
        for (images, labels, skipped), (d_images, d_labels, d_skipped) in zip(batches(in_memory), batches(cache),
                                                                                strict=True):
            assert torch.equal(images, d_images) and torch.equal(labels, d_labels) and skipped == d_skipped


def test_a_failed_or_killed_build_leaves_nothing_that_is_read(tmp_path):
    samples = make_samples(10, skipped=set())
    entry = StoredImages(tmp_path, "x", {"what": "test"})
    with pytest.raises(RuntimeError, match="the build fails"):
        entry.build(fill_from(samples, fail_at=6))
    assert list(tmp_path.iterdir()) == [] and entry.open() is None
    # a build killed with SIGKILL leaves its .partial folder: never read, removed by the next build here
    dead = tmp_path / f"x.partial-{os.uname().nodename}-{2**31 - 1}"
    alive = tmp_path / f"y.partial-{os.uname().nodename}-{os.getppid()}"  # another build still running
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "manifest.json").write_text("{}")
    assert entry.open() is None
    assert entry.build(fill_from(samples)) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x", alive.name]


def test_auto_goes_to_disk_when_memory_is_short():
    gib = 2**30
    assert cache_kind("auto", gib, available=8 * gib, free_disk=0) == "memory"
    assert cache_kind("auto", 3 * gib, available=8 * gib, free_disk=int(3 * gib / AUTO_DISK_SHARE)) == "disk"
    assert cache_kind("auto", 3 * gib, available=8 * gib, free_disk=int(3 * gib / AUTO_DISK_SHARE) - 1) == "off"
    assert cache_kind("auto", 3 * gib, available=None, free_disk=None) == "off"
    assert [cache_kind(mode, gib, available=0, free_disk=0) for mode in ("on", "off", "disk")] == ["memory", "off",
                                                                                                   "disk"]
    with pytest.raises(ValueError):
        cache_kind("always", 1)
    assert engine.TrainSettings(epochs=1, batch_size=1, lr=0.1, weight_decay=0).cache_dir == DEFAULT_CACHE_DIR
    assert engine.runs.TrainJob("x", None, 1, 1, 0.1).cache_dir == DEFAULT_CACHE_DIR


def write_folder(root: Path) -> None:
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (12 + i, 12), (i * 20, 80, 160 if name == "cat" else 40)).save(root / name / f"{i}.png")


@pytest.fixture
def counted_reads(monkeypatch):
    """How many images the folder data sets have read (decoded) since the last call."""
    reads = []
    original = data.datasets.ImageFileDataset.__getitem__
    monkeypatch.setattr(data.datasets.ImageFileDataset, "__getitem__",
                        lambda self, index: reads.append(index) or original(self, index))

    def count() -> int:
        total = len(reads)
        reads.clear()
        return total

    return count


def test_reused_without_decoding_and_rebuilt_when_a_file_changes(pretrained, tmp_path, capsys, counted_reads):
    _, a = pretrained
    folder, cache_dir = tmp_path / "data", tmp_path / "cache"
    write_folder(folder)
    argv = ["--dataset", "imagefolder", "--data_dir", str(folder), "--arch", "resnet20", "--img_size", "12",
            "--batch_size", "4", "--workers", "0", "--device", "cpu", "--max_epoch", "1", "-a", str(a),
            "--cache", "disk", "--cache_dir", str(cache_dir)]

    def run(name: str) -> int:
        assert run_cli(finetune.main, argv + ["-b", str(tmp_path / f"{name}.pth")]) == 0
        assert f"images in {cache_dir} (memory-mapped)" in capsys.readouterr().out
        return counted_reads()

    assert run("first") == 2 + 20  # a probe per split, then every image once
    assert run("second") == 0  # not one image decoded
    assert_same_weights(load_state_dict_safely(tmp_path / "first.pth"), load_state_dict_safely(tmp_path / "second.pth"))
    changed = folder / "dog" / "3.png"
    Image.new("RGB", (15, 12), (1, 2, 3)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    in_train = str(changed) in [path for path, _ in data.datasets.build_dataset("imagefolder", folder, "train").samples]
    folders = {p.name.split("-")[1]: (p / "manifest.json").read_text() for p in cache_dir.iterdir()}
    assert run("third") == 2 + (16 if in_train else 4)  # that split's key changed: written again
    rewritten = {p.name.split("-")[1]: (p / "manifest.json").read_text() for p in cache_dir.iterdir()}
    assert rewritten.keys() == folders.keys() == {"training", "validation"}  # the old folder replaced
    assert [split for split in folders if folders[split] != rewritten[split]] == [
        "training" if in_train else "validation"]
    assert run("fourth") == 0


def test_auto_uses_a_written_disk_cache_when_memory_is_short(pretrained, tmp_path, capsys, monkeypatch):
    _, a = pretrained
    cache_dir = tmp_path / "cache"
    assert run_cli(finetune.main, finetune_argv(a, tmp_path / "disk.pth", "--cache", "disk", "--cache_dir",
                                                str(cache_dir), epochs=1)) == 0
    monkeypatch.setattr(data.cache, "available_memory", lambda: 1000)
    monkeypatch.setattr(data.cache, "free_space", lambda folder: 0)  # no room for a new one
    assert run_cli(finetune.main, finetune_argv(a, tmp_path / "auto.pth", "--cache_dir", str(cache_dir),
                                                epochs=1)) == 0
    assert "(memory-mapped)" in capsys.readouterr().out
    assert run_cli(finetune.main, finetune_argv(a, tmp_path / "none.pth", "--cache_dir", str(tmp_path / "empty"),
                                                epochs=1)) == 0
    assert "holding" not in capsys.readouterr().out and not (tmp_path / "empty").exists()


def test_training_with_the_disk_cache_is_bit_identical(pretrained, tmp_path):
    _, a = pretrained
    assert run_cli(finetune.main, finetune_argv(a, tmp_path / "disk.pth", "--cache", "disk", "--cache_dir",
                                                str(tmp_path / "cache"))) == 0
    assert run_cli(finetune.main, finetune_argv(a, tmp_path / "off.pth", "--cache", "off")) == 0
    disk = torch.load(tmp_path / "disk.last.pth", weights_only=True)
    off = torch.load(tmp_path / "off.last.pth", weights_only=True)
    assert_same_weights(disk["model"], off["model"])
    keep = ("train_loss", "train_acc", "val_loss", "val_acc", "skipped_images")
    assert [{k: e[k] for k in keep} for e in disk["history"]] == [{k: e[k] for k in keep} for e in off["history"]]


def test_cache_dir_errors_are_one_line(pretrained, tmp_path, capsys, monkeypatch):
    _, a = pretrained
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    argv = finetune_argv(a, tmp_path / "x.pth", "--cache", "disk", "--cache_dir", str(not_a_folder / "sub"), epochs=1)
    expect_error(capsys, finetune.main, argv, "--cache_dir", str(not_a_folder / "sub"))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    argv = finetune_argv(a, tmp_path / "x.pth", "--cache", "disk", "--cache_dir", str(tmp_path / "c"), epochs=1)
    expect_error(capsys, finetune.main, argv, "--cache_dir", os.strerror(errno.ENOSPC), "GiB needed")
    assert not list(tmp_path.glob("x*")) and list((tmp_path / "c").iterdir()) == []
    # --cache auto, with memory short, falls back to reading the files, and says why
    monkeypatch.setattr(data.cache, "available_memory", lambda: 1000)
    argv = finetune_argv(a, tmp_path / "y.pth", "--cache_dir", str(tmp_path / "c"), epochs=1)
    assert run_cli(finetune.main, argv) == 0
    out = capsys.readouterr().out
    assert "--cache auto: --cache_dir" in out and "reading the files every epoch" in out


TORCHRUN_SCRIPT = """
    import os, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {repo!r})
    import data.cache
    import engine
    from data.transforms import BatchAugment
    from engine.processes import join_process_group, leave_process_group
    from models import build_model

    out = Path(sys.argv[1])
    data.cache.SHARED_MEMORY = out / "shm"  # the node's shared memory, here the test's own folder
    data.cache.SHARED_MEMORY.mkdir(exist_ok=True)

    class Counted(torch.utils.data.Dataset):
        classes = [0, 1]

        def __init__(self, count, offset, log):
            self.count, self.offset, self.log = count, offset, log

        def __len__(self):
            return self.count

        def __getitem__(self, index):
            with open(self.log, "a") as handle:
                handle.write(f"{{index}}\\n")
            generator = torch.Generator().manual_seed(index + self.offset)
            return torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=generator), index % 2

    process = join_process_group("cpu")
    for mode in ("off", "on", "disk"):
        log = out / f"reads-{{mode}}-{{process.rank}}.txt"
        log.touch()
        torch.manual_seed(0)
        model = build_model("resnet20", 2)
        settings = engine.TrainSettings(epochs=2, batch_size=4, lr=0.05, weight_decay=0.0, workers=0, cache=mode,
                                        cache_dir=str(out / "cache"), progress=False)
        engine.fit(model, Counted(16, 0, log), Counted(8, 100, log), settings, process, out / f"{{mode}}.pth",
                   announce=print, augment=BatchAugment(8))
        torch.save(model.state_dict(), out / f"weights-{{mode}}-{{process.rank}}.pt")
    leave_process_group(process)
"""


@pytest.mark.parametrize("nodes", [1, 2])
def test_torchrun_decodes_once_per_node(tmp_path, nodes):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT.format(repo=str(REPO))))
    out = torchrun_nodes(nodes, [str(script), str(tmp_path)])
    reads = {(mode, rank): len((tmp_path / f"reads-{mode}-{rank}.txt").read_text().split())
             for mode in ("off", "on", "disk") for rank in (0, 1)}
    assert reads[("off", 0)] > 0 and reads[("off", 1)] > 0  # each process reads its share every epoch
    everything = 16 + 8 + 2  # each image of both splits, and one probe per split
    # the memory cache: each node's first process decodes each image once
    assert (reads[("on", 0)], reads[("on", 1)]) == ((everything, 0) if nodes == 1 else (everything, everything)), reads
    # the disk cache in a folder the nodes share: the job's first process writes it, the other node maps it
    # (having decoded one probe per split to choose where its images go)
    assert (reads[("disk", 0)], reads[("disk", 1)]) == (everything, 0 if nodes == 1 else 2), reads
    assert "images in memory" in out and "(memory-mapped)" in out
    assert list((tmp_path / "shm" / "transferability-images").iterdir()) == []  # removed once mapped
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "cache").iterdir()) == ["training", "validation"]
    weights = {(mode, rank): torch.load(tmp_path / f"weights-{mode}-{rank}.pt", weights_only=True)
               for mode in ("off", "on", "disk") for rank in (0, 1)}
    for (mode, rank), state in weights.items():
        assert_same_weights(weights[("off", rank)], state)  # each process saw the same batches in every mode
    learnt = [{k: v for k, v in weights[("on", rank)].items() if "running_" not in k} for rank in (0, 1)]
    assert_same_weights(*learnt)  # (BatchNorm's running statistics are each process's own)


def test_shared_memory_without_room_falls_back_to_the_next_place(tmp_path):
    samples = make_samples(6, skipped=set())
    blocked = tmp_path / "file"
    blocked.write_text("")
    places = [StoredImages(blocked / "shm", "x", {}), StoredImages(tmp_path / "dir", "x", {})]
    cache = loading.open_or_build(places, fill_from(samples))
    assert cache is not None and places[1].complete() and places[1].open(check=False) is not None
    said = []
    assert loading.open_or_build(places[:1], fill_from(samples), said.append) is None  # --cache auto: a note
    assert said and "--cache_dir" in said[0] and "reading the files every epoch" in said[0]
    with pytest.raises(data.cache.CacheFolderError, match="--cache_dir"):
        loading.open_or_build(places[:1], fill_from(samples))


class OtherProcesses:
    """A process of a job whose other processes report ``status`` (see loading.settle)."""

    distributed, rank, local_rank = True, 1, 1

    def __init__(self, status: float) -> None:
        self.status = status

    def all_reduce(self, values, op=None):
        return [min(values[0], self.status)]


def test_a_failure_elsewhere_stops_the_waiting_processes():
    assert loading.settle(lambda: 5, OtherProcesses(2.0)) == 5
    with pytest.raises(loading.Interrupted):
        loading.settle(None, OtherProcesses(1.0))  # the builder was stopped by a signal
    with pytest.raises(loading.UserError, match="another process"):
        loading.settle(None, OtherProcesses(0.0))
    with pytest.raises(ZeroDivisionError):  # the process that failed raises its own error
        loading.settle(lambda: 1 / 0, OtherProcesses(2.0))

"""Dataset registry (data.build_dataset): every dataset from fake data in its official
on-disk layout, seeded splits, user errors, corrupt images, transforms.

Each fake image is a tiny solid colour whose red channel encodes the label the dataset
must give it (``RED0 + RED_STEP * label``), so a sample paired with the wrong label fails.
"""
from __future__ import annotations

import pickle
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from data import (
    DATASETS,
    NORMALIZE_MEAN,
    NORMALIZE_STD,
    CorruptImageError,
    build_dataset,
    build_transform,
    canonical_name,
    collate_skip_none,
    dataset_names,
    load_rgb,
)
from data.datasets import FLOWERS17_CLASSES
from utils import UserError

RED0, RED_STEP = 20, 12  # labels 0..17 fit in a byte with room for JPEG's rounding


def colour(label: int, k: int) -> tuple[int, int, int]:
    return (RED0 + RED_STEP * label, 40 + (7 * k) % 180, 90)


def label_of_image(image: Image.Image) -> int:
    return round((image.getpixel((4, 4))[0] - RED0) / RED_STEP)


def write_image(path: Path, label: int, k: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.new("RGB", (8, 8), colour(label, k)).save(path, **options)
    return str(path)


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


@dataclass
class Layout:
    """What a fake layout holds: the answers build_dataset must give."""

    paper_name: str
    classes: list[str]
    train: dict[str, int]        # images per class in "train"
    val: dict[str, int]          # images per class in "val"
    files: set[str] = field(default_factory=set)  # every image in train or val
    seeded: bool = False


# ------------------------------------------------------------------------- fake layouts


def _cifar(root: Path, folder: str, train_files: list[str], test_files: list[str], meta_file: str,
           meta_key: str, label_key: str, classes: list[str], train_labels: list[list[int]],
           test_labels: list[int], paper_name: str) -> Layout:
    base = root / folder

    def batch(path: Path, labels: list[int]) -> None:
        rows = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
        for k, label in enumerate(labels):
            rows[k, 0], rows[k, 1], rows[k, 2] = colour(label, k)
        entry = {"data": rows.reshape(len(labels), 3072), label_key: labels,
                 "filenames": [f"{k}.png" for k in labels]}
        if label_key == "fine_labels":
            entry["coarse_labels"] = [0] * len(labels)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(entry, protocol=2))

    for name, labels in zip(train_files, train_labels):
        batch(base / name, labels)
    batch(base / test_files[0], test_labels)
    (base / meta_file).write_bytes(pickle.dumps({meta_key: classes}, protocol=2))
    count = lambda labels: {classes[label]: n for label, n in Counter(labels).items()}  # noqa: E731
    return Layout(paper_name, classes, count(sum(train_labels, [])), count(test_labels))


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar10(root: Path) -> Layout:
    train = [[b, b + 5, 3] for b in range(5)]
    return _cifar(root, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                  "batches.meta", "label_names", "labels", CIFAR10_CLASSES, train, [2, 2, 7], "CIFAR-10")


def make_cifar100(root: Path) -> Layout:
    classes = [f"fine_{i:02d}" for i in range(100)]
    return _cifar(root, "cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels",
                  classes, [[0, 3, 17, 17]], [3, 5], "CIFAR-100")


def make_caltech101(root: Path) -> Layout:
    base = root / "caltech101" / "101_ObjectCategories"
    counts = {"BACKGROUND_Google": 32, "Faces": 35, "accordion": 31}
    files = {write_image(base / name / f"image_{k:04d}.jpg", label, k)
             for label, (name, n) in enumerate(counts.items()) for k in range(1, n + 1)}
    (base / "Faces" / "Thumbs.db").write_bytes(b"not an image")  # ignored: not an image type
    return Layout("Caltech-101", list(counts), {c: 30 for c in counts},
                  {"BACKGROUND_Google": 2, "Faces": 5, "accordion": 1}, files, seeded=True)


def make_cub200(root: Path) -> Layout:
    base = root / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    train_flags = {0: [1, 1, 1, 0], 1: [1, 0, 1, 0], 2: [0, 0, 1, 0]}
    images, labels, split, files = [], [], [], set()
    image_id = 0
    for label, name in enumerate(classes):
        for k, flag in enumerate(train_flags[label]):
            image_id += 1
            relative = f"{name}/{name[4:]}_{k + 1:04d}_{700 + image_id}.jpg"
            files.add(write_image(base / "images" / relative, label, image_id))
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {label + 1}")
            split.append(f"{image_id} {flag}")
    write_lines(base / "images.txt", images)
    write_lines(base / "image_class_labels.txt", labels)
    write_lines(base / "train_test_split.txt", split)
    write_lines(base / "classes.txt", [f"{i + 1} {name}" for i, name in enumerate(classes)])
    return Layout("CUB-200", classes, dict(zip(classes, (3, 2, 1))), dict(zip(classes, (1, 2, 3))), files)


def make_aircraft(root: Path) -> Layout:
    data = root / "fgvc-aircraft-2013b" / "data"
    classes = ["707-320", "A300B4", "F-16A/B"]
    per_split = {"trainval": (3, 2, 2), "test": (1, 2, 1)}
    files, number = set(), 34300
    for official, counts in per_split.items():
        lines = []
        for label, (name, n) in enumerate(zip(classes, counts)):
            for _ in range(n):
                number += 1
                files.add(write_image(data / "images" / f"{number:07d}.jpg", label, number))
                lines.append(f"{number:07d} {name}")
        write_lines(data / f"images_variant_{official}.txt", lines)
    write_lines(data / "variants.txt", classes)
    return Layout("Aircraft", classes, dict(zip(classes, per_split["trainval"])),
                  dict(zip(classes, per_split["test"])), files)


def make_flowers(root: Path, folder: str = "jpg") -> Layout:
    files = {write_image(root / folder / f"image_{i:04d}.jpg", (i - 1) // 80, i) for i in range(1, 1361)}
    write_lines(root / folder / "files.txt", [f"image_{i:04d}.jpg" for i in range(1, 1361)])
    classes = list(FLOWERS17_CLASSES)
    return Layout("Flowers", classes, {c: 64 for c in classes}, {c: 16 for c in classes}, files, seeded=True)


def make_landuse(root: Path, folder: str = "UCMerced_LandUse/Images") -> Layout:
    classes = ["agricultural", "airplane", "beach"]
    files = {write_image(root / folder / name / f"{name}{k:02d}.tif", label, k)
             for label, name in enumerate(classes) for k in range(10)}
    return Layout("Land-Use", classes, {c: 8 for c in classes}, {c: 2 for c in classes}, files, seeded=True)


def make_pocus(root: Path) -> Layout:
    counts = {"covid": (5, ".jpg"), "pneumonia": (10, ".png"), "regular": (6, ".jpg")}
    files = {write_image(root / name / f"{name.title()}-Atlas ({k}).gif_frame{k * 3}{ext}", label, k)
             for label, (name, (n, ext)) in enumerate(counts.items()) for k in range(n)}
    return Layout("POCUS", list(counts), {"covid": 4, "pneumonia": 8, "regular": 5},
                  {"covid": 1, "pneumonia": 2, "regular": 1}, files, seeded=True)


def make_dtd(root: Path) -> Layout:
    data = root / "dtd" / "dtd"
    classes = ["banded", "blotchy", "zigzagged"]
    per_split = {"train1": (2, 3, 1), "val1": (1, 1, 1), "test1": (2, 1, 2)}
    files, k = set(), 0
    for listing, counts in per_split.items():
        lines = []
        for label, (name, n) in enumerate(zip(classes, counts)):
            for _ in range(n):
                k += 1
                path = write_image(data / "images" / name / f"{name}_{k:04d}.jpg", label, k)
                files |= {path} if listing != "val1" else set()
                lines.append(f"{name}/{name}_{k:04d}.jpg")
        write_lines(data / "labels" / f"{listing}.txt", lines)
    return Layout("DTD", classes, dict(zip(classes, per_split["train1"])),
                  dict(zip(classes, per_split["test1"])), files)


def make_domainnet(root: Path, domain: str) -> Layout:
    # Labels are not in alphabetical order here: classes must follow the label index.
    classes = ["zebra", "aircraft_carrier", "The_Eiffel_Tower"]
    per_split = {"train": (3, 2, 2), "test": (1, 2, 1)}
    files, k = set(), 0
    for split, counts in per_split.items():
        lines = []
        for label, (name, n) in enumerate(zip(classes, counts)):
            for _ in range(n):
                k += 1
                relative = f"{domain}/{name}/{domain}_{label + 1:03d}_{k:06d}.jpg"
                files.add(write_image(root / relative, label, k))
                lines.append(f"{relative} {label}")
        write_lines(root / f"{domain}_{split}.txt", lines)
    paper = {"real": "DomainNet-r", "painting": "DomainNet-p", "clipart": "DomainNet-c"}[domain]
    return Layout(paper, classes, dict(zip(classes, per_split["train"])),
                  dict(zip(classes, per_split["test"])), files)


def make_imagenet(root: Path) -> Layout:
    classes = ["n01440764", "n01443537"]
    per_split = {"train": (3, 4), "val": (2, 1)}
    files = {write_image(root / split / name / f"{name}_{k}.JPEG", label, k)
             for split, counts in per_split.items()
             for label, (name, n) in enumerate(zip(classes, counts)) for k in range(n)}
    return Layout("ImageNet", classes, dict(zip(classes, per_split["train"])),
                  dict(zip(classes, per_split["val"])), files)


def make_imagefolder(root: Path) -> Layout:
    classes = ["cats", "dogs"]
    files = {write_image(root / name / f"{k:03d}{ext}", label, k)
             for label, (name, n, ext) in enumerate([("cats", 5, ".png"), ("dogs", 10, ".jpeg")])
             for k in range(n)}
    (root / "README.txt").write_text("not a class")  # a file beside the class folders: ignored
    return Layout("imagefolder", classes, {"cats": 4, "dogs": 8}, {"cats": 1, "dogs": 2}, files, seeded=True)


LAYOUTS: dict[str, Callable[[Path], Layout]] = {
    "cifar10": make_cifar10,
    "cifar100": make_cifar100,
    "caltech101": make_caltech101,
    "cub200": make_cub200,
    "aircraft": make_aircraft,
    "flowers": make_flowers,
    "landuse": make_landuse,
    "pocus": make_pocus,
    "dtd": make_dtd,
    "domainnet-r": lambda root: make_domainnet(root, "real"),
    "domainnet-p": lambda root: make_domainnet(root, "painting"),
    "domainnet-c": lambda root: make_domainnet(root, "clipart"),
    "imagenet": make_imagenet,
    "imagefolder": make_imagefolder,
}
FILE_BASED = [name for name in LAYOUTS if not name.startswith("cifar")]
SEEDED = ["caltech101", "flowers", "landuse", "pocus", "imagefolder"]


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Callable[[str], tuple[Path, Layout]]:
    """``layout(name)``: a read-only fake layout, written once per module."""
    cache: dict[str, tuple[Path, Layout]] = {}

    def get(name: str) -> tuple[Path, Layout]:
        if name not in cache:
            root = tmp_path_factory.mktemp(name.replace("-", "_"))
            cache[name] = (root, LAYOUTS[name](root))
        return cache[name]

    return get


def paths_of(dataset) -> list[str]:
    return [path for path, _ in dataset.samples]


def error_text(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, "user errors are one line"
    return text


# ------------------------------------------------------------------------- every layout


def test_every_dataset_but_synthetic_has_a_fake_layout():
    assert sorted(LAYOUTS) == sorted(set(dataset_names()) - {"synthetic"})


@pytest.mark.parametrize("name", LAYOUTS)
def test_both_splits_have_the_right_classes_counts_and_labels(layout, name):
    root, expected = layout(name)
    splits = {split: build_dataset(expected.paper_name, root, split) for split in ("train", "val")}
    for split, counts in (("train", expected.train), ("val", expected.val)):
        dataset = splits[split]
        assert dataset.classes == expected.classes
        assert len(dataset) == len(dataset.targets) == sum(counts.values())
        assert Counter(dataset.classes[t] for t in dataset.targets) == Counter(counts)
        for i in range(len(dataset)):
            image, label = dataset[i]
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            assert label == dataset.targets[i]
            assert label_of_image(image) == label, f"{split}[{i}] is paired with the wrong label"


@pytest.mark.parametrize("name", FILE_BASED)
def test_train_and_val_are_disjoint_and_cover_the_split_images(layout, name):
    root, expected = layout(name)
    train = paths_of(build_dataset(name, root, "train"))
    val = paths_of(build_dataset(name, root, "val"))
    assert len(set(train)) == len(train) and len(set(val)) == len(val)
    assert not set(train) & set(val)
    assert set(train) | set(val) == expected.files


@pytest.mark.parametrize("name", LAYOUTS)
def test_transform_is_applied(layout, name):
    root, expected = layout(name)
    dataset = build_dataset(name, root, "val", transform=build_transform(False, 16))
    image, label = dataset[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert label == dataset.targets[0]


def test_caltech101_keeps_background_google_and_30_train_images_per_class(layout):
    root, _ = layout("caltech101")
    train = build_dataset("caltech101", root, "train")
    assert "BACKGROUND_Google" in train.classes
    assert Counter(train.targets) == {0: 30, 1: 30, 2: 30}


def test_flowers_labels_follow_file_order_80_per_class(layout):
    root, _ = layout("flowers")
    dataset = build_dataset("flowers", root, "train")
    number = lambda path: int(Path(path).stem.split("_")[1])  # noqa: E731
    assert all((number(path) - 1) // 80 == label for path, label in dataset.samples)
    assert dataset.classes[0] == "Daffodil" and dataset.classes[-1] == "Pansy" and len(dataset.classes) == 17


def test_flowers_also_found_under_17flowers(tmp_path):
    expected = make_flowers(tmp_path, "17flowers/jpg")
    assert len(build_dataset("Flowers", tmp_path, "train")) == 17 * 64
    assert set(paths_of(build_dataset("Flowers", tmp_path, "val"))) <= expected.files


def test_landuse_also_found_under_images(tmp_path):
    make_landuse(tmp_path, "Images")
    dataset = build_dataset("Land-Use", tmp_path, "train")
    assert len(dataset) == 24 and dataset.classes == ["agricultural", "airplane", "beach"]


def test_dtd_also_accepts_the_dtd_folder_as_data_dir(layout):
    root, expected = layout("dtd")
    for data_dir in (root / "dtd", root / "dtd" / "dtd"):
        assert set(paths_of(build_dataset("dtd", data_dir, "train"))) == set(
            paths_of(build_dataset("dtd", root, "train")))


def test_cifar_also_accepts_the_batch_folder_as_data_dir(layout):
    root, _ = layout("cifar10")
    assert build_dataset("cifar10", root / "cifar-10-batches-py", "val").targets == [2, 2, 7]


def test_cub_accepts_its_own_folder_as_data_dir(layout):
    root, _ = layout("cub200")
    assert paths_of(build_dataset("cub200", root / "CUB_200_2011", "val")) == paths_of(
        build_dataset("cub200", root, "val"))


def test_imagenet_val_uses_train_class_indices(tmp_path):
    for name in ("n02", "n03", "n01"):
        write_image(tmp_path / "train" / name / "a.JPEG", 0)
    write_image(tmp_path / "val" / "n03" / "b.JPEG", 0)
    val = build_dataset("imagenet", tmp_path, "val")
    assert val.classes == ["n01", "n02", "n03"] and val.targets == [2]


# ------------------------------------------------------------------------ seeded splits


@pytest.mark.parametrize("name", SEEDED)
def test_seeded_split_is_reproducible_and_depends_on_the_seed(layout, name):
    root, _ = layout(name)
    for split in ("train", "val"):
        first = paths_of(build_dataset(name, root, split, seed=0))
        assert paths_of(build_dataset(name, root, split, seed=0)) == first
        other = paths_of(build_dataset(name, root, split, seed=1))
        assert other != first and sorted(other) != sorted(first)


def test_seeded_split_is_the_same_on_every_machine(layout):
    # Known answer: a change of the split algorithm (or a dependence on the global RNG or
    # on Python's hash seed) would change which files are held out.
    root, _ = layout("imagefolder")
    val = sorted(Path(path).relative_to(root).as_posix()
                 for path in paths_of(build_dataset("imagefolder", root, "val")))
    assert val == KNOWN_IMAGEFOLDER_VAL_SEED0


KNOWN_IMAGEFOLDER_VAL_SEED0 = ["cats/004.png", "dogs/003.jpeg", "dogs/004.jpeg"]


def test_seeded_split_ignores_the_global_rng(layout):
    import random

    root, _ = layout("landuse")
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    first = paths_of(build_dataset("landuse", root, "val", seed=3))
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    assert paths_of(build_dataset("landuse", root, "val", seed=3)) == first


def test_official_splits_ignore_the_seed(layout):
    root, _ = layout("cub200")
    assert paths_of(build_dataset("cub200", root, "train", seed=0)) == paths_of(
        build_dataset("cub200", root, "train", seed=5))


# ---------------------------------------------------------------------------- the names


PAPER_SPELLINGS = {
    "CIFAR-10": "cifar10", "CIFAR-100": "cifar100", "Caltech-101": "caltech101", "CUB-200": "cub200",
    "Aircraft": "aircraft", "Flowers": "flowers", "Land-Use": "landuse", "Land Use": "landuse",
    "POCUS": "pocus", "DTD": "dtd", "DomainNet-r": "domainnet-r", "DomainNet-p": "domainnet-p",
    "DomainNet-c": "domainnet-c", "domainnetr": "domainnet-r", "DOMAINNET_C": "domainnet-c",
    "ImageNet": "imagenet", "image_folder": "imagefolder", "cifar_10": "cifar10",
    "synthetic": "synthetic", "synthetic:classes=10,n=200": "synthetic",
}


@pytest.mark.parametrize("spelling", PAPER_SPELLINGS)
def test_paper_spellings_name_the_datasets(spelling):
    assert canonical_name(spelling) == PAPER_SPELLINGS[spelling]


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(UserError) as excinfo:
        canonical_name("foo")
    text = error_text(excinfo)
    assert text.startswith("--dataset foo: unknown dataset; choose one of ")
    assert all(name in text for name in dataset_names())
    with pytest.raises(UserError, match="unknown dataset"):
        build_dataset("cifar11", "/nowhere", "train")


def test_options_are_for_synthetic_and_a_folder_for_imagefolder_only():
    with pytest.raises(UserError, match=r"only synthetic \(options\) and imagefolder \(a folder\)"):
        canonical_name("cifar10:n=5")
    assert canonical_name("imagefolder:/data/digits") == "imagefolder"


def test_imagefolder_named_by_its_folder_is_the_same_data_set_and_carries_its_name(layout, tmp_path):
    from data.datasets import dataset_label

    root, _ = layout("imagefolder")
    for split in ("train", "val"):
        assert paths_of(build_dataset(f"imagefolder:{root}", None, split)) == paths_of(
            build_dataset("imagefolder", root, split))
    # the folder in the name wins over --data_dir
    assert paths_of(build_dataset(f"imagefolder:{root}", tmp_path / "elsewhere", "val")) == paths_of(
        build_dataset("imagefolder", root, "val"))
    assert dataset_label(f"imagefolder:{root}") == root.name == dataset_label("imagefolder", root)
    assert dataset_label("CIFAR-10", "/data") == "CIFAR-10"
    with pytest.raises(UserError, match=f"--dataset imagefolder:{tmp_path / 'none'}: no such folder"):
        build_dataset(f"imagefolder:{tmp_path / 'none'}", None, "train")


def test_split_must_be_train_or_val(layout):
    root, _ = layout("imagefolder")
    with pytest.raises(ValueError, match="split"):
        build_dataset("imagefolder", root, "test")


# ------------------------------------------------------------------------ the registry


# The paper's table (docs/datasets.md): classes and training-set size N.
PAPER_TABLE = {
    "cifar10": (10, 50_000), "cifar100": (100, 50_000), "caltech101": (102, 3_060),
    "cub200": (200, 5_994), "aircraft": (100, 6_667), "flowers": (17, 1_088), "landuse": (21, 1_680),
    "pocus": (3, 1_692), "dtd": (47, 1_880), "domainnet-r": (345, 120_906),
    "domainnet-p": (345, 50_416), "domainnet-c": (345, 33_525), "imagenet": (1000, 1_281_167),
    "imagefolder": (None, None), "synthetic": (None, None),
}


def test_registry_matches_the_paper_table():
    assert {name: (spec.num_classes, spec.train_size) for name, spec in DATASETS.items()} == PAPER_TABLE


def test_registry_image_sizes_and_layouts():
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert spec.img_size == (32 if name.startswith("cifar") else 224) or name == "synthetic"
        assert spec.layout and "\n" not in spec.layout


def test_seeded_split_sizes_give_the_table_n():
    # 30 per class for Caltech-101; all but int(0.2 n) of 80 (Flowers) and of 100 (UC Merced) per class.
    from data.datasets import _train_count

    assert DATASETS["caltech101"].train_size == 30 * 102
    assert DATASETS["flowers"].train_size == _train_count(80) * 17 == 64 * 17
    assert DATASETS["landuse"].train_size == _train_count(100) * 21 == 80 * 21


def test_split_count_is_the_seeds_int_rule():
    from data.datasets import _train_count

    # the seed keeps int(0.2 n) for validation; round(0.8 n) would differ for these n
    assert [_train_count(n) for n in (1, 2, 3, 4, 7, 9, 13, 14)] == [1, 2, 3, 4, 6, 8, 11, 12]
    assert all(_train_count(n) == n - int(0.2 * n) for n in range(0, 500))
    assert sum(_train_count(n) != round(0.8 * n) for n in range(1, 100)) > 10


# ------------------------------------------------------------------------------ errors


def test_missing_root(tmp_path):
    with pytest.raises(UserError) as excinfo:
        build_dataset("cub200", tmp_path / "nope", "train")
    text = error_text(excinfo)
    assert str(tmp_path / "nope") in text and "no such folder" in text


def test_root_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        build_dataset("dtd", tmp_path / "f", "train")


def test_root_is_required(tmp_path):
    with pytest.raises(UserError, match="needs --data_dir"):
        build_dataset("CUB-200", None, "train")


EXPECTED_FIRST = {
    "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
    "caltech101": "caltech101/101_ObjectCategories", "cub200": "CUB_200_2011/images.txt",
    "aircraft": "fgvc-aircraft-2013b/data/variants.txt", "flowers": "jpg/image_0001.jpg",
    "landuse": "UCMerced_LandUse/Images", "pocus": "covid", "dtd": "dtd/dtd/labels/train1.txt",
    "domainnet-r": "real_train.txt", "domainnet-p": "painting_train.txt", "domainnet-c": "clipart_train.txt",
    "imagenet": "train", "imagefolder": "<class>/<image>",
}


@pytest.mark.parametrize("name", EXPECTED_FIRST)
def test_an_empty_data_dir_names_the_expected_path(tmp_path, name):
    with pytest.raises(UserError) as excinfo:
        build_dataset(name, tmp_path, "train")
    text = error_text(excinfo)
    assert text.startswith(f"--data_dir {tmp_path}: expected {tmp_path / EXPECTED_FIRST[name]} (")
    assert text.endswith("see docs/datasets.md")


def test_cub_error_message_is_the_documented_one(tmp_path):
    with pytest.raises(UserError) as excinfo:
        build_dataset("CUB-200", tmp_path, "train")
    assert error_text(excinfo) == (
        f"--data_dir {tmp_path}: expected {tmp_path}/CUB_200_2011/images.txt ({DATASETS['cub200'].layout}); "
        "see docs/datasets.md")


@pytest.mark.parametrize("name, relative", [
    ("cub200", "CUB_200_2011/train_test_split.txt"),
    ("cub200", "CUB_200_2011/classes.txt"),
    ("cifar10", "cifar-10-batches-py/data_batch_3"),
    ("cifar10", "cifar-10-batches-py/batches.meta"),
    ("cifar100", "cifar-100-python/test"),
    ("aircraft", "fgvc-aircraft-2013b/data/images_variant_test.txt"),
    ("dtd", "dtd/dtd/labels/test1.txt"),
    ("domainnet-p", "painting_test.txt"),
    ("imagenet", "val"),
    ("pocus", "regular"),
])
def test_a_missing_layout_file_is_named(tmp_path, name, relative):
    LAYOUTS[name](tmp_path)
    target = tmp_path / relative
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError) as excinfo:
        build_dataset(name, tmp_path, "val")
    assert f"expected {target} (" in error_text(excinfo)


def test_a_missing_flowers_image_is_named(tmp_path):
    make_flowers(tmp_path)
    (tmp_path / "jpg" / "image_0005.jpg").unlink()
    with pytest.raises(UserError) as excinfo:
        build_dataset("flowers", tmp_path, "train")
    assert f"expected {tmp_path / 'jpg' / 'image_0005.jpg'}" in error_text(excinfo)


@pytest.mark.parametrize("name, folder", [
    ("imagefolder", "birds"),
    ("caltech101", "caltech101/101_ObjectCategories/airplanes"),
    ("landuse", "UCMerced_LandUse/Images/forest"),
    ("pocus", "covid"),
    ("imagenet", "train/n09999999"),
])
def test_an_empty_class_folder_is_named(tmp_path, name, folder):
    LAYOUTS[name](tmp_path)
    empty = tmp_path / folder
    if empty.exists():
        shutil.rmtree(empty)
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(UserError) as excinfo:
        build_dataset(name, tmp_path, "train")
    assert error_text(excinfo).startswith(f"{empty}: class folder holds no images")


@pytest.mark.parametrize("name, split", [
    ("cub200", "train"), ("aircraft", "val"), ("dtd", "train"), ("domainnet-c", "val"),
])
def test_a_split_file_line_naming_a_missing_image_is_named(tmp_path, name, split):
    LAYOUTS[name](tmp_path)
    victim = paths_of(build_dataset(name, tmp_path, split))[-1]
    Path(victim).unlink()
    with pytest.raises(UserError) as excinfo:
        build_dataset(name, tmp_path, split)
    assert error_text(excinfo).startswith(f"{victim}: listed in ")


def test_imagenet_flat_val_folder_is_refused(tmp_path):
    make_imagenet(tmp_path)
    shutil.rmtree(tmp_path / "val")
    write_image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", 0)
    with pytest.raises(UserError, match="one folder per class"):
        build_dataset("imagenet", tmp_path, "val")


def test_imagenet_val_class_unknown_to_train_is_refused(tmp_path):
    make_imagenet(tmp_path)
    write_image(tmp_path / "val" / "n09999999" / "x.JPEG", 0)
    with pytest.raises(UserError, match="no counterpart"):
        build_dataset("imagenet", tmp_path, "val")


def test_domainnet_label_used_for_two_folders_is_refused(tmp_path):
    make_domainnet(tmp_path, "real")
    with open(tmp_path / "real_test.txt", "a") as handle:
        handle.write("real/aircraft_carrier/real_002_000001.jpg 0\n")
    with pytest.raises(UserError, match="label 0 is used for both"):
        build_dataset("domainnet-r", tmp_path, "train")


def test_dtd_split_file_missing_a_class_is_refused(tmp_path):
    make_dtd(tmp_path)
    test1 = tmp_path / "dtd" / "dtd" / "labels" / "test1.txt"
    kept = [line for line in test1.read_text().split() if not line.startswith("blotchy")]
    test1.write_text("".join(line + "\n" for line in kept))
    with pytest.raises(UserError, match="lists 2 classes but .* has 3 class folders .*blotchy"):
        build_dataset("dtd", tmp_path, "val")


@pytest.mark.parametrize("name, relative, extra, expected", [
    ("domainnet-r", "real_train.txt", "real/zebra/x.jpg", "line 8: expected 2 fields"),
    ("domainnet-r", "real_train.txt", "real/zebra/x.jpg zero", "line 8: 'zero' is not an integer"),
    ("cub200", "CUB_200_2011/train_test_split.txt", "13", "line 13: expected 2 fields"),
    ("cub200", "CUB_200_2011/classes.txt", "four 004.Groove_billed_Ani", "line 4: 'four' is not an integer"),
])
def test_a_malformed_list_file_line_is_named(tmp_path, name, relative, extra, expected):
    LAYOUTS[name](tmp_path)
    with open(tmp_path / relative, "a") as handle:
        handle.write(extra + "\n")
    with pytest.raises(UserError) as excinfo:
        build_dataset(name, tmp_path, "train")
    assert error_text(excinfo).startswith(f"{tmp_path / relative}: {expected}")
    assert error_text(excinfo).endswith("the file is damaged, extract it again")


def test_a_list_file_path_may_hold_spaces(tmp_path):
    make_domainnet(tmp_path, "real")
    relative = "real/zebra/real 001 000099.jpg"
    write_image(tmp_path / relative, 0)
    with open(tmp_path / "real_train.txt", "a") as handle:
        handle.write(f"{relative} 0\n")
    assert (str(tmp_path / relative), 0) in build_dataset("domainnet-r", tmp_path, "train").samples


def test_a_damaged_cifar_batch_is_a_user_error(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable CIFAR batch folder"):
        build_dataset("cifar10", tmp_path, "val")


# ----------------------------------------------------------------------- corrupt images


def corrupt(path: str, how: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(b"this is not an image" if how == "garbage" else data[: len(data) // 2])


@pytest.mark.parametrize("name", ["imagefolder", "dtd", "aircraft", "cub200", "landuse"])
@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_a_corrupt_image_is_named_or_skipped(tmp_path, name, how):
    LAYOUTS[name](tmp_path)
    dataset = build_dataset(name, tmp_path, "train")
    bad = 1
    bad_path = dataset.samples[bad][0]
    corrupt(bad_path, how)
    with pytest.raises(CorruptImageError) as excinfo:
        dataset[bad]
    assert excinfo.value.path == bad_path and error_text(excinfo).startswith(f"{bad_path}: ")
    assert isinstance(excinfo.value, UserError)

    skipping = build_dataset(name, tmp_path, "train", transform=build_transform(False, 8), skip_corrupt=True)
    items = [skipping[i] for i in range(len(skipping))]
    assert items[bad] is None and sum(item is None for item in items) == 1
    images, labels = collate_skip_none(items)
    assert images.shape == (len(items) - 1, 3, 8, 8)
    assert labels.tolist() == [t for i, t in enumerate(skipping.targets) if i != bad]


def test_collate_skip_none_in_a_data_loader(tmp_path):
    make_imagefolder(tmp_path)
    dataset = build_dataset("imagefolder", tmp_path, "train", transform=build_transform(False, 8),
                            skip_corrupt=True)
    corrupt(dataset.samples[0][0], "garbage")
    corrupt(dataset.samples[5][0], "truncated")
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_skip_none)
    sizes = [len(labels) for _, labels in loader]
    assert sizes == [3, 3, 4] and sum(sizes) == len(dataset) - 2


def test_collate_skip_none_of_an_all_corrupt_batch_is_none():
    assert collate_skip_none([None, None]) is None


def test_load_rgb_converts_every_mode_to_rgb(tmp_path):
    modes = (("L", 128), ("RGBA", (10, 20, 30, 40)), ("P", 3), ("I;16", 300), ("CMYK", (0, 0, 0, 0)))
    for mode, value in modes:
        path = tmp_path / f"{mode.replace(';', '_')}.{'tif' if mode in ('I;16', 'CMYK') else 'png'}"
        Image.new(mode, (4, 4), value).save(path)
        image = load_rgb(path)
        assert image.mode == "RGB" and image.size == (4, 4)


def test_load_rgb_names_a_missing_or_non_image_file(tmp_path):
    with pytest.raises(CorruptImageError, match="no such image file"):
        load_rgb(tmp_path / "missing.jpg")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(CorruptImageError) as excinfo:
        load_rgb(tmp_path / "text.jpg")
    assert str(tmp_path / "text.jpg") in str(excinfo.value)



# 16-bit and floating-point images: scaled to 8 bits by their real range (docs/datasets.md),
# where PIL's own convert("RGB") clips 16-bit grey to 255 and truncates floats in [0, 1] to 0.

GRADIENT_16 = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)


def assert_grey(path: Path, expected: np.ndarray) -> None:
    """``load_rgb(path)`` is an RGB image whose three channels all equal ``expected``."""
    rgb = np.asarray(load_rgb(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (*expected.shape, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_load_rgb_scales_16_bit_grey_by_the_16_bit_range(tmp_path, suffix):
    path = tmp_path / f"grey16.{suffix}"
    Image.fromarray(GRADIENT_16).save(path)
    assert Image.open(path).mode == "I;16"
    expected = np.rint(GRADIENT_16 / 257).astype(np.uint8)
    assert expected.min() == 0 and expected.max() == 255 and len(np.unique(expected)) == 64
    assert_grey(path, expected)


def test_load_rgb_scales_big_endian_16_bit_grey(tmp_path):
    path = tmp_path / "grey16b.tif"
    Image.frombytes("I;16B", (8, 8), GRADIENT_16.astype(">u2").tobytes()).save(path)
    assert Image.open(path).mode == "I;16B"
    assert_grey(path, np.rint(GRADIENT_16 / 257).astype(np.uint8))


def test_load_rgb_scales_32_bit_integer_images(tmp_path):
    """Mode I: values within 0..65535 are 16-bit data (/257); others are stretched min-max."""
    sixteen, wide = tmp_path / "sixteen.tif", tmp_path / "wide.tif"
    Image.fromarray(GRADIENT_16.astype(np.int32)).save(sixteen)
    assert Image.open(sixteen).mode == "I"
    assert_grey(sixteen, np.rint(GRADIENT_16 / 257).astype(np.uint8))
    values = np.linspace(-1000, 99000, 64).astype(np.int32).reshape(8, 8)
    Image.fromarray(values).save(wide)
    assert_grey(wide, np.rint((values + 1000) * (255 / 100000)).astype(np.uint8))


def test_load_rgb_scales_float_images_in_0_1_by_255(tmp_path):
    path = tmp_path / "float.tif"
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    expected = np.rint(values.astype(np.float64) * 255).astype(np.uint8)
    assert expected.min() == 0 and expected.max() == 255
    assert_grey(path, expected)


def test_load_rgb_stretches_float_images_outside_0_1_and_clips_constant_ones(tmp_path):
    path, constant, negative = tmp_path / "wide.tif", tmp_path / "constant.tif", tmp_path / "negative.tif"
    values = np.linspace(-2, 6, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(values).save(path)
    assert_grey(path, np.rint((values.astype(np.float64) + 2) * (255 / 8)).astype(np.uint8))
    Image.fromarray(np.full((4, 4), 3.5, np.float32)).save(constant)
    assert_grey(constant, np.full((4, 4), 255, np.uint8))  # clipped to 1.0, the top of [0, 1]
    Image.fromarray(np.full((4, 4), -3.5, np.float32)).save(negative)
    assert_grey(negative, np.zeros((4, 4), np.uint8))


def test_load_rgb_refuses_a_float_image_with_nan_by_name(tmp_path):
    path = tmp_path / "nan.tif"
    values = np.zeros((4, 4), np.float32)
    values[1, 2] = np.nan
    Image.fromarray(values).save(path)
    with pytest.raises(CorruptImageError, match="NaN") as excinfo:
        load_rgb(path)
    assert str(excinfo.value).startswith(f"{path}: ")


def _write_png_rgb48(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), by hand: IHDR, IDAT, IEND."""
    import struct
    import zlib

    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_load_rgb_reads_16_bit_rgb_by_its_top_8_bits(tmp_path):
    """PIL itself reduces a 48-bit PNG to 8 bits per channel (the high byte)."""
    path = tmp_path / "rgb48.png"
    rgb = np.stack([GRADIENT_16, 65535 - GRADIENT_16, np.full_like(GRADIENT_16, 300)], axis=-1)
    _write_png_rgb48(path, rgb)
    loaded = np.asarray(load_rgb(path))
    np.testing.assert_array_equal(loaded, (rgb >> 8).astype(np.uint8))
    assert loaded[..., 0].max() == 255 and loaded[..., 1].min() == 0

# --------------------------------------------------------------------------- transforms


def test_val_transform_resizes_and_normalises():
    image = Image.new("RGB", (20, 12), (255, 0, 128))
    tensor = build_transform(False, 16)(image)
    assert tensor.shape == (3, 16, 16)
    expected = (torch.tensor([255, 0, 128]) / 255 - 0.5) / 0.225
    assert torch.allclose(tensor[:, 8, 8], expected, atol=1e-6)
    assert NORMALIZE_MEAN == (0.5, 0.5, 0.5) and NORMALIZE_STD == (0.225, 0.225, 0.225)


def test_train_transform_recipe():
    steps = [type(step) for step in build_transform(True, 32).transforms]
    assert steps == [T.Resize, T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToImage, T.ToDtype, T.Normalize, T.ToPureTensor]
    jitter = build_transform(True, 32, color_jitter=0.4).transforms[3]
    assert isinstance(jitter, T.ColorJitter) and jitter.brightness == (0.6, 1.4)
    assert jitter.contrast == (0.6, 1.4) and jitter.saturation == (0.6, 1.4) and jitter.hue is None
    assert build_transform(True, 32)(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    assert [type(s) for s in build_transform(False, 32).transforms] == [T.Resize, T.ToImage, T.ToDtype, T.Normalize, T.ToPureTensor]
    # the same recipe on a uint8 image tensor (the synthetic benchmark's images)
    tensor = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    out = build_transform(True, 32, color_jitter=0.4)(tensor)
    assert out.shape == (3, 32, 32) and type(out) is torch.Tensor  # a plain tensor, no tv_tensor


# ------------------------------------------------------- EXIF orientation, other files in class folders


def test_a_jpeg_with_an_exif_orientation_loads_upright(tmp_path):
    pixels = np.zeros((40, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (250, 10, 10)  # left half red, right half blue: the turn is visible
    pixels[:, 32:] = (10, 10, 250)
    stored = Image.fromarray(pixels)
    for tag, upright in ((6, np.rot90(pixels, -1)), (8, np.rot90(pixels, 1)), (1, pixels)):
        exif = Image.Exif()
        exif[0x0112] = tag
        path = tmp_path / f"turned{tag}.jpg"
        stored.save(path, quality=95, exif=exif)
        loaded = np.asarray(load_rgb(path)).astype(int)
        assert loaded.shape == upright.shape
        assert np.abs(loaded - upright.astype(int)).mean() < 4, tag  # JPEG's rounding only


def test_hidden_files_in_class_folders_are_not_read(tmp_path):
    make_imagefolder(tmp_path)
    (tmp_path / "cats" / ".hidden.jpg").write_bytes(b"garbage, not an image")
    (tmp_path / "dogs" / "._x.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    for split in ("train", "val"):
        dataset = build_dataset("imagefolder", tmp_path, split)
        assert not any(Path(path).name.startswith(".") for path, _ in dataset.samples)
        assert all(dataset[i] is not None for i in range(len(dataset)))
    assert sum(len(build_dataset("imagefolder", tmp_path, s)) for s in ("train", "val")) == 15
    from data.datasets import ignored_files_notice

    assert ignored_files_notice(build_dataset("imagefolder", tmp_path, "train")) is None  # skipped without a word


def test_files_of_other_types_in_class_folders_are_reported_once(tmp_path):
    from data.datasets import ignored_files_notice

    make_imagefolder(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "moving.gif")
    (tmp_path / "dogs" / "photo.avif").write_bytes(b"avif")
    (tmp_path / "dogs" / "Thumbs.db").write_bytes(b"windows")  # system files: no notice
    train, val = (build_dataset("imagefolder", tmp_path, split) for split in ("train", "val"))
    assert len(train) + len(val) == 15
    notice = ignored_files_notice(train, val)
    assert notice.startswith("ignored 2 files of other types in the class folders (.avif, .gif; e.g. ")
    assert ".jpg .jpeg .png" in notice and "\n" not in notice
    assert ignored_files_notice(build_dataset("imagefolder", tmp_path, "train")).startswith("ignored 2 files")


@pytest.mark.parametrize("name", FILE_BASED)
def test_every_file_based_dataset_decodes_on_the_device(layout, name):
    """--decode device on each layout: the same samples, labels and classes, each image's
    pixels those of --decode loader within a level (here on the CPU's decoder)."""
    from data.device_decode import device_decoded
    from data.transforms import build_loading_transform

    root, expected = layout(name)
    for split in ("train", "val"):
        loader = build_dataset(expected.paper_name, root, split, build_loading_transform(8))
        device = device_decoded(build_dataset(expected.paper_name, root, split), 8, expected.paper_name)
        assert device.classes == loader.classes and device.targets == loader.targets
        assert [path for path, _ in device.samples] == paths_of(loader)
        batch, labels, dropped = device.collate([device[i] for i in range(len(device))])
        assert dropped == 0 and labels.tolist() == loader.targets
        images = batch.decode(torch.device("cpu"))
        expected_images = torch.stack([loader[i][0] for i in range(len(loader))])
        assert (images.int() - expected_images.int()).abs().max() <= 1


def test_small_images_in_a_folder_get_a_note_with_the_size_to_use(layout):
    """8-px images resized to 224 px cost 49 times the computation of 32-px ones: say so once,
    naming --img_size; images near the size get no note, nor do data sets not made of files."""
    from data.datasets import small_images_note

    root, _ = layout("imagefolder")  # 8 x 8 images
    train = build_dataset("imagefolder", root, "train")
    note = small_images_note(train, 224)
    assert note.startswith("note: the images are about 8 px but are resized to 224 px")
    assert "--img_size 32" in note and "49x less computation" in note
    assert small_images_note(train, 32) is None and small_images_note(train, 16) is None
    assert small_images_note(build_dataset("synthetic:classes=2,n=4", None, "train"), 224) is None

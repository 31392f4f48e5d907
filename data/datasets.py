"""Dataset registry: the paper's datasets, read from their official on-disk layouts.

``build_dataset(name, root, split)`` returns a ``torch.utils.data.Dataset`` whose items are
``(transform(rgb_pil_image), label)``, with ``.classes`` (label i <-> ``classes[i]``) and
``.targets`` (one label per sample, in index order). ``split`` is ``"train"`` or ``"val"``:
"val" is the official test/val split where the dataset has one, otherwise the held-out part
of a seeded split that is the same on every machine (file lists are sorted, then shuffled
per class by a private generator seeded with ``seed`` and the class name).

torchvision's classes are used where one reads the layout (CIFAR, FGVC-Aircraft, DTD); the
other datasets are lists of ``(path, label)`` pairs in :class:`ImageFileDataset`. Every
file-based dataset loads images with :func:`data.image_io.load_rgb`, so a damaged image
raises :class:`CorruptImageError` naming the file, or yields ``None`` with
``skip_corrupt=True`` (:func:`collate_skip_none` then drops it from the batch). Nothing here
downloads anything.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from torch.utils.data import Dataset, default_collate
from torchvision import datasets as tv_datasets

from data.image_io import IMAGE_EXTENSIONS, CorruptImageError, is_image_file, load_rgb
from utils import UserError

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "ImageFileDataset",
    "build_dataset",
    "canonical_name",
    "collate_skip_none",
    "dataset_names",
    "dataset_label",
    "small_images_note",
    "default_img_size",
    "ignored_files_notice",
    "imagefolder_path",
    "reads_files",
    "seeded_split",
]

SPLITS = ("train", "val")
# Share of each class that goes to "val" in the seeded splits: int(0.2 * n) images, the
# rest to "train", the count rule of the seed's datasets.ImageDataset.
VAL_FRACTION = 0.2
CALTECH_TRAIN_PER_CLASS = 30
FLOWERS_IMAGES_PER_CLASS = 80
# Oxford 17 Flowers: image_0001..0080 are class 0, image_0081..0160 class 1, and so on, in
# the order the dataset's page lists the categories.
FLOWERS17_CLASSES = (
    "Daffodil", "Snowdrop", "LilyValley", "Bluebell", "Crocus", "Iris", "Tigerlily", "Tulip",
    "Fritillary", "Sunflower", "Daisy", "ColtsFoot", "Dandelion", "Cowslip", "Buttercup",
    "Windflower", "Pansy",
)
POCUS_CLASSES = ("covid", "pneumonia", "regular")
DOMAINNET_DOMAINS = {"domainnet-r": "real", "domainnet-p": "painting", "domainnet-c": "clipart"}
# Files Windows leaves in folders (lower case): not images, and ignored without a notice.
SYSTEM_FILES = ("thumbs.db", "desktop.ini")

# (root, split, transform, skip_corrupt, seed) -> dataset
Builder = Callable[[Path, str, Any, bool, int], Dataset]


# ----------------------------------------------------------------------------- datasets


class ImageFileDataset(Dataset):
    """Images given as ``(path, label)`` pairs, loaded with :func:`load_rgb`. ``ignored``: the
    files of its class folders that were left out for their extension (:func:`_images_in`)."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str],
                 transform: Callable | None = None, skip_corrupt: bool = False,
                 ignored: Sequence[str] = ()) -> None:
        self.samples = [(str(path), int(label)) for path, label in samples]
        self.ignored = list(ignored)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.transform = transform
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
        except CorruptImageError:
            if self.skip_corrupt:
                return None
            raise
        if self.transform is not None:
            image = self.transform(image)
        return image, label


class _SkipsCorruptImages:
    """For torchvision datasets built with ``loader=load_rgb``: a corrupt image gives
    ``None`` instead of an error when ``skip_corrupt`` is set."""

    skip_corrupt = False

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except CorruptImageError:
            if self.skip_corrupt:
                return None
            raise


class DTD(_SkipsCorruptImages, tv_datasets.DTD):
    """torchvision's DTD with ``.targets``, ``.samples`` and the project's image loader.
    (torchvision derives the folder ``<root>/dtd`` from the class name: keep it ``DTD``.)"""

    def __init__(self, root: Path, split: str, transform=None, skip_corrupt: bool = False) -> None:
        super().__init__(str(root), split=split, partition=1, transform=transform, loader=load_rgb)
        self.skip_corrupt = skip_corrupt
        self.samples = [(str(path), label) for path, label in zip(self._image_files, self._labels)]
        self.targets = list(self._labels)


class FGVCAircraftImages(_SkipsCorruptImages, tv_datasets.FGVCAircraft):
    """torchvision's FGVC-Aircraft (variant level) with ``.targets``, ``.samples`` and the
    project's image loader."""

    def __init__(self, root: Path, split: str, transform=None, skip_corrupt: bool = False) -> None:
        super().__init__(str(root), split=split, annotation_level="variant", transform=transform,
                         loader=load_rgb)
        self.skip_corrupt = skip_corrupt
        self.samples = [(str(path), label) for path, label in zip(self._image_files, self._labels)]
        self.targets = list(self._labels)


class CIFAR10Files(tv_datasets.CIFAR10):
    """torchvision's CIFAR-10 reading the batch files as they are: it checks that they
    exist, not their MD5 sums (a re-packed copy is as good as the original), and never
    downloads. The images live in memory, so there is nothing to skip as corrupt."""

    train_list = [[name, None] for name, _ in tv_datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in tv_datasets.CIFAR10.test_list]
    meta = {**tv_datasets.CIFAR10.meta, "md5": None}

    def _check_integrity(self) -> bool:
        folder = Path(self.root, self.base_folder)
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    def download(self) -> None:
        raise UserError(f"{Path(self.root, self.base_folder)}: downloading is disabled; "
                        "put the extracted python version of the dataset there")


class CIFAR100Files(CIFAR10Files):
    """torchvision's CIFAR-100 (fine labels), read as :class:`CIFAR10Files` reads CIFAR-10."""

    base_folder = tv_datasets.CIFAR100.base_folder
    train_list = [[name, None] for name, _ in tv_datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in tv_datasets.CIFAR100.test_list]
    meta = {**tv_datasets.CIFAR100.meta, "md5": None}


def collate_skip_none(batch: Sequence[Any]) -> Any:
    """``default_collate`` of the samples that are not ``None`` (the corrupt images a
    ``skip_corrupt`` dataset skipped). The number dropped is ``len(batch)`` minus the
    collated batch size. Returns ``None`` when every sample of the batch was dropped."""
    kept = [sample for sample in batch if sample is not None]
    return default_collate(kept) if kept else None


# ------------------------------------------------------------------------------ helpers


def seeded_split(items: Sequence[Any], n_train: int, seed: int, key: str) -> tuple[list, list]:
    """Split ``items`` (already in a canonical order) into ``n_train`` training items and the
    rest, chosen by a private generator seeded with ``(seed, key)``: the same on every
    machine and Python version, independent of the global RNG and of other keys (classes).
    Each part keeps the items' original order."""
    order = list(range(len(items)))
    # as bytes: a folder name that is not valid UTF-8 (os.fsdecode's surrogates) seeds too, and
    # valid names give the very generator their text would
    random.Random(f"{seed}/{key}".encode("utf-8", "surrogateescape")).shuffle(order)
    chosen = set(order[:n_train])
    train = [item for i, item in enumerate(items) if i in chosen]
    val = [item for i, item in enumerate(items) if i not in chosen]
    return train, val


def _train_count(n: int) -> int:
    """Training images of a class of ``n``: all but ``int(0.2 * n)`` (the seed's rule; for
    some n it keeps one image more for training than ``round(0.8 * n)``)."""
    return n - int(VAL_FRACTION * n)


def _split_per_class(files_by_class: Sequence[Sequence[str]], classes: Sequence[str], split: str,
                     seed: int, n_train_of: Callable[[int], int]) -> list[tuple[str, int]]:
    samples: list[tuple[str, int]] = []
    for label, (name, files) in enumerate(zip(classes, files_by_class)):
        train, val = seeded_split(files, min(n_train_of(len(files)), len(files)), seed, name)
        samples += [(path, label) for path in (train if split == "train" else val)]
    return samples


def _layout_error(root: Path, expected: Path, layout: str) -> UserError:
    return UserError(f"--data_dir {root}: expected {expected} ({layout}); see docs/datasets.md")


def _locate(root: Path, candidates: Sequence[Path], marker: str, layout: str) -> Path:
    """The first candidate folder holding ``marker`` (a file or folder name; "" = the
    candidate itself is a folder). The error names the first candidate's expected path."""
    for folder in candidates:
        if (folder / marker).exists() if marker else folder.is_dir():
            return folder
    raise _layout_error(root, candidates[0] / marker if marker else candidates[0], layout)


def _require_files(root: Path, paths: Iterable[Path], layout: str) -> None:
    for path in paths:
        if not path.is_file():
            raise _layout_error(root, path, layout)


def _class_folders(folder: Path) -> list[str]:
    """Sorted names of the sub-folders (hidden ones excluded)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _images_in(folder: Path, ignored: list[str] | None = None) -> list[str]:
    """Sorted paths of the image files (:data:`data.image_io.IMAGE_EXTENSIONS`) in ``folder``;
    an error naming it when it has none. Hidden files (``.DS_Store``, macOS's ``._IMG.jpg``
    AppleDouble files) are skipped; the paths of other files (``.gif``, ``.avif``, ``README``)
    are added to ``ignored``, except :data:`SYSTEM_FILES`."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file())
    files = [name for name in names if is_image_file(name)]
    if ignored is not None:
        ignored.extend(str(folder / name) for name in names
                       if not is_image_file(name) and name.lower() not in SYSTEM_FILES)
    if not files:
        raise UserError(f"{folder}: class folder holds no images (.jpg, .png, .tif, ...); "
                        "add its images or remove the folder")
    return [str(folder / name) for name in files]


def ignored_files_notice(*datasets: Dataset) -> str | None:
    """One line naming how many files the class folders of ``datasets`` (each possibly
    wrapped, as ``.dataset``) held that were left out for their extension, and which
    extensions; None when there were none. torchvision's ImageFolder drops them silently."""
    paths = sorted({path for data in datasets for path in getattr(getattr(data, "dataset", data), "ignored", ())})
    if not paths:
        return None
    kinds = sorted({os.path.splitext(path)[1].lower() or "no extension" for path in paths})
    return (f"ignored {len(paths)} file{'' if len(paths) == 1 else 's'} of other types in the class folders "
            f"({', '.join(kinds)}; e.g. {paths[0]}); images are read from {' '.join(IMAGE_EXTENSIONS)} files only")


def reads_files(dataset: Dataset) -> bool:
    """Whether ``dataset`` (possibly wrapped, as ``.dataset``) reads an image file for each
    item: not the generated synthetic set, nor CIFAR, whose batches torchvision holds in memory."""
    return isinstance(getattr(dataset, "dataset", dataset), (ImageFileDataset, _SkipsCorruptImages))


# By hand, not np.loadtxt or csv: the free field may hold spaces, and a bad line must be a UserError
# naming the file and the line.
def _read_list_file(path: Path, fields: int, free_field: str = "last") -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of each non-blank line of a whitespace-separated list file;
    the ``free_field`` ("first" or "last") may itself hold spaces."""
    rows = []
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file; the file is damaged, extract it again") from None
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=fields - 1) if free_field == "first" else line.split(maxsplit=fields - 1)
        if len(parts) != fields:
            raise UserError(f"{path}: line {number}: expected {fields} fields, got {line!r}; "
                            "the file is damaged, extract it again")
        rows.append((number, parts))
    return rows


def _check_listed_files(paths: Iterable[str], list_file: Path) -> None:
    """Every image a split file names must exist; one directory listing per folder."""
    listing: dict[str, set[str]] = {}
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in listing:
            try:
                with os.scandir(folder) as entries:
                    listing[folder] = {e.name for e in entries}
            except (FileNotFoundError, NotADirectoryError):
                listing[folder] = set()
        if name not in listing[folder]:
            raise UserError(f"{path}: listed in {list_file} but missing; "
                            "the dataset is incomplete, extract it again")


def _int(value: str, path: Path, number: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{path}: line {number}: {value!r} is not an integer; "
                        "the file is damaged, extract it again") from None


# ----------------------------------------------------------------------------- builders


def _build_cifar(cls: type[CIFAR10Files], canonical: str) -> Builder:
    def build(root: Path, split: str, transform, skip_corrupt: bool, seed: int) -> Dataset:
        layout = DATASETS[canonical].layout
        base = root if root.name == cls.base_folder else root / cls.base_folder
        if not base.is_dir():
            raise _layout_error(root, base, layout)
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        _require_files(root, (base / name for name in names), layout)
        try:
            return cls(str(base.parent), train=split == "train", transform=transform, download=False)
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001
            # Every file is there (checked above), so any failure of torchvision's parser
            # (UnpicklingError, EOFError, KeyError, ValueError from a reshape...) means a
            # damaged or foreign file.
            raise UserError(f"{base}: not a readable CIFAR batch folder ({type(err).__name__}: "
                            f"{err}); extract the python version of the dataset again") from None
    return build


def _build_caltech101(root: Path, split: str, transform, skip_corrupt: bool, seed: int) -> Dataset:
    layout = DATASETS["caltech101"].layout
    folder = _locate(root, [root / "caltech101" / "101_ObjectCategories", root / "101_ObjectCategories"],
                     "", layout)
    classes = _class_folders(folder)
    if not classes:
        raise _layout_error(root, folder / "<class>/image_0001.jpg", layout)
    ignored: list[str] = []
    files = [_images_in(folder / name, ignored) for name in classes]
    samples = _split_per_class(files, classes, split, seed, lambda n: CALTECH_TRAIN_PER_CLASS)
    return ImageFileDataset(samples, classes, transform, skip_corrupt, ignored)


def _build_cub200(root: Path, split: str, transform, skip_corrupt: bool, seed: int) -> Dataset:
    layout = DATASETS["cub200"].layout
    base = _locate(root, [root / "CUB_200_2011", root], "images.txt", layout)
    lists = {name: base / f"{name}.txt" for name in
             ("images", "image_class_labels", "train_test_split", "classes")}
    _require_files(root, lists.values(), layout)

    classes_rows = _read_list_file(lists["classes"], 2)
    class_ids = [_int(row[0], lists["classes"], n) for n, row in classes_rows]
    if class_ids != list(range(1, len(class_ids) + 1)):
        raise UserError(f"{lists['classes']}: class ids must run 1, 2, ..., N in order; "
                        "the file is damaged, extract it again")
    classes = [row[1] for _, row in classes_rows]

    def by_image_id(name: str) -> dict[str, tuple[int, str]]:
        return {row[0]: (n, row[1]) for n, row in _read_list_file(lists[name], 2)}

    labels, is_train = by_image_id("image_class_labels"), by_image_id("train_test_split")
    samples = []
    for number, (image_id, relative) in _read_list_file(lists["images"], 2):
        for name, table in (("image_class_labels", labels), ("train_test_split", is_train)):
            if image_id not in table:
                raise UserError(f"{lists[name]}: no line for image id {image_id} "
                                f"({lists['images']} line {number}); extract the dataset again")
        label = _int(labels[image_id][1], lists["image_class_labels"], labels[image_id][0]) - 1
        if not 0 <= label < len(classes):
            raise UserError(f"{lists['image_class_labels']}: line {labels[image_id][0]}: "
                            f"class {label + 1} is not in {lists['classes']}")
        flag = is_train[image_id][1]
        if flag not in ("0", "1"):
            raise UserError(f"{lists['train_test_split']}: line {is_train[image_id][0]}: "
                            f"is_training_image must be 0 or 1, got {flag!r}")
        if (flag == "1") == (split == "train"):
            samples.append((str(base / "images" / relative), label))
    _check_listed_files((path for path, _ in samples), lists["images"])
    return ImageFileDataset(samples, classes, transform, skip_corrupt)


def _build_aircraft(root: Path, split: str, transform, skip_corrupt: bool, seed: int) -> Dataset:
    layout = DATASETS["aircraft"].layout
    candidates = [root / "fgvc-aircraft-2013b"] + ([root] if root.name == "fgvc-aircraft-2013b" else [])
    base = _locate(root, candidates, "data/variants.txt", layout)
    official = "trainval" if split == "train" else "test"
    split_file = base / "data" / f"images_variant_{official}.txt"
    _require_files(root, [split_file], layout)
    try:
        dataset = FGVCAircraftImages(base.parent, official, transform, skip_corrupt)
    except KeyError as err:
        raise UserError(f"{split_file}: names variant {err} that is not in "
                        f"{base / 'data' / 'variants.txt'}; extract the dataset again") from None
    _check_listed_files((path for path, _ in dataset.samples), split_file)
    return dataset


def _build_flowers(root: Path, split: str, transform, skip_corrupt: bool, seed: int) -> Dataset:
    layout = DATASETS["flowers"].layout
    folder = _locate(root, [root / "jpg", root / "17flowers" / "jpg", root], "image_0001.jpg", layout)
    with os.scandir(folder) as entries:
        present = {e.name for e in entries}
    total = FLOWERS_IMAGES_PER_CLASS * len(FLOWERS17_CLASSES)
    names = [f"image_{i:04d}.jpg" for i in range(1, total + 1)]
    for name in names:
        if name not in present:
            raise UserError(f"--data_dir {root}: expected {folder / name} (Oxford 17 Flowers has "
                            f"image_0001.jpg..image_{total:04d}.jpg); the download is incomplete")
    paths = [str(folder / name) for name in names]
    per_class = FLOWERS_IMAGES_PER_CLASS
    files = [paths[c * per_class:(c + 1) * per_class] for c in range(len(FLOWERS17_CLASSES))]
    samples = _split_per_class(files, FLOWERS17_CLASSES, split, seed, _train_count)
    return ImageFileDataset(samples, FLOWERS17_CLASSES, transform, skip_corrupt)


def _build_landuse(root: Path, split: str, transform, skip_corrupt: bool, seed: int) -> Dataset:
    layout = DATASETS["landuse"].layout
    folder = _locate(root, [root / "UCMerced_LandUse" / "Images", root / "Images"], "", layout)
    return _seeded_class_folders(root, folder, layout, split, transform, skip_corrupt, seed)


def _build_pocus(root: Path, split: str, transform, skip_corrupt: bool, seed: int) -> Dataset:
    layout = DATASETS["pocus"].layout
    for name in POCUS_CLASSES:
        if not (root / name).is_dir():
            raise _layout_error(root, root / name, layout)
    ignored: list[str] = []
    files = [_images_in(root / name, ignored) for name in POCUS_CLASSES]
    samples = _split_per_class(files, POCUS_CLASSES, split, seed, _train_count)
    return ImageFileDataset(samples, POCUS_CLASSES, transform, skip_corrupt, ignored)


def _build_dtd(root: Path, split: str, transform, skip_corrupt: bool, seed: int) -> Dataset:
    layout = DATASETS["dtd"].layout
    # torchvision reads <R>/dtd/dtd/{images,labels}; also accept --data_dir pointing at <R>/dtd.
    candidates = [root]
    if root.name == "dtd":
        candidates.append(root.parent)
        if root.parent.name == "dtd":
            candidates.append(root.parent.parent)
    base = _locate(root, candidates, "dtd/dtd/labels/train1.txt", layout)
    data = base / "dtd" / "dtd"
    split_file = data / "labels" / ("train1.txt" if split == "train" else "test1.txt")
    _require_files(root, [split_file], layout)
    if not (data / "images").is_dir():
        raise _layout_error(root, data / "images", layout)
    try:
        dataset = DTD(base, "train" if split == "train" else "test", transform, skip_corrupt)
    except ValueError:
        raise UserError(f"{split_file}: every line must read <class>/<image>.jpg; "
                        "the file is damaged, extract the dataset again") from None
    # torchvision numbers the classes a split file mentions: both splits must mention all
    # of them, or train and val labels would disagree.
    folders = _class_folders(data / "images")
    if dataset.classes != folders:
        absent = sorted(set(folders) - set(dataset.classes)) or sorted(set(dataset.classes) - set(folders))
        raise UserError(f"{split_file}: lists {len(dataset.classes)} classes but {data / 'images'} has "
                        f"{len(folders)} class folders (first difference: {absent[0]}); "
                        "extract the dataset again")
    _check_listed_files((path for path, _ in dataset.samples), split_file)
    return dataset


def _build_domainnet(canonical: str) -> Builder:
    domain = DOMAINNET_DOMAINS[canonical]

    def build(root: Path, split: str, transform, skip_corrupt: bool, seed: int) -> Dataset:
        layout = DATASETS[canonical].layout
        lists = {s: root / f"{domain}_{s}.txt" for s in ("train", "test")}
        _require_files(root, lists.values(), layout)
        folder_of_label: dict[int, str] = {}
        entries: dict[str, list[tuple[str, int]]] = {}
        for name, path in lists.items():
            entries[name] = []
            for number, (relative, label_text) in _read_list_file(path, 2, free_field="first"):
                label = _int(label_text, path, number)
                parts = Path(relative).parts
                if len(parts) < 3:
                    raise UserError(f"{path}: line {number}: expected "
                                    f"{domain}/<class>/<image>.jpg <label>, got {relative!r}")
                if folder_of_label.setdefault(label, parts[-2]) != parts[-2]:
                    raise UserError(f"{path}: line {number}: label {label} is used for both "
                                    f"{folder_of_label[label]!r} and {parts[-2]!r}")
                entries[name].append((str(root / relative), label))
        labels = sorted(folder_of_label)
        if not labels:
            raise UserError(f"{lists['train']}, {lists['test']}: list no images; "
                            "extract the list files again")
        if labels != list(range(len(labels))):
            missing = sorted(set(range(max(labels) + 1)) - set(labels))
            raise UserError(f"{lists['train']}, {lists['test']}: no image has label {missing[0]}; "
                            "labels must run 0..K-1, extract the list files again")
        classes = [folder_of_label[label] for label in labels]
        samples = entries["train" if split == "train" else "test"]
        list_file = lists["train" if split == "train" else "test"]
        _check_listed_files((path for path, _ in samples), list_file)
        return ImageFileDataset(samples, classes, transform, skip_corrupt)
    return build


def _build_imagenet(root: Path, split: str, transform, skip_corrupt: bool, seed: int) -> Dataset:
    layout = DATASETS["imagenet"].layout
    train_dir, split_dir = root / "train", root / split
    for folder in (train_dir, split_dir):
        if not folder.is_dir():
            raise _layout_error(root, folder, layout)
    classes = _class_folders(train_dir)
    if not classes:
        raise _layout_error(root, train_dir / "<wnid>/<image>.JPEG", layout)
    present = _class_folders(split_dir) if split == "val" else classes
    if not present:
        raise UserError(f"{split_dir}: expected one folder per class (val/<wnid>/<image>.JPEG); "
                        "sort the flat ILSVRC2012 validation images into class folders")
    label_of = {name: label for label, name in enumerate(classes)}
    unknown = [name for name in present if name not in label_of]
    if unknown:
        raise UserError(f"{split_dir / unknown[0]}: class folder has no counterpart in {train_dir}; "
                        "train and val must use the same class folders")
    ignored: list[str] = []
    samples = [(path, label_of[name]) for name in present for path in _images_in(split_dir / name, ignored)]
    return ImageFileDataset(samples, classes, transform, skip_corrupt, ignored)


def _build_imagefolder(root: Path, split: str, transform, skip_corrupt: bool, seed: int) -> Dataset:
    return _seeded_class_folders(root, root, DATASETS["imagefolder"].layout, split, transform,
                                 skip_corrupt, seed)


def _seeded_class_folders(root: Path, folder: Path, layout: str, split: str, transform,
                          skip_corrupt: bool, seed: int) -> Dataset:
    classes = _class_folders(folder)
    if not classes:
        raise _layout_error(root, folder / "<class>/<image>", layout)
    ignored: list[str] = []
    files = [_images_in(folder / name, ignored) for name in classes]
    samples = _split_per_class(files, classes, split, seed, _train_count)
    return ImageFileDataset(samples, classes, transform, skip_corrupt, ignored)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetSpec:
    """What the registry knows about one dataset."""

    name: str                    # canonical name (``--dataset``)
    title: str                   # the paper's spelling
    num_classes: int | None      # None: decided by the data (imagefolder, synthetic)
    train_size: int | None       # expected N of the training split (docs/datasets.md)
    img_size: int                # default input resolution
    layout: str                  # the expected on-disk layout under --data_dir, one line
    build: Builder | None = field(repr=False, compare=False)  # None: synthetic, see build_dataset
    aliases: tuple[str, ...] = ()


_SPECS = (
    DatasetSpec("imagenet", "ImageNet", 1000, 1_281_167, 224,
                "<data_dir>/train/<wnid>/*.JPEG and <data_dir>/val/<wnid>/*.JPEG",
                _build_imagenet, ("ilsvrc2012",)),
    DatasetSpec("cifar10", "CIFAR-10", 10, 50_000, 32,
                "<data_dir>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}, "
                "torchvision's python version", _build_cifar(CIFAR10Files, "cifar10")),
    DatasetSpec("cifar100", "CIFAR-100", 100, 50_000, 32,
                "<data_dir>/cifar-100-python/{train,test,meta}, torchvision's python version",
                _build_cifar(CIFAR100Files, "cifar100")),
    DatasetSpec("caltech101", "Caltech-101", 102, 3_060, 224,
                "<data_dir>/caltech101/101_ObjectCategories/<class>/image_*.jpg, "
                "all 102 folders including BACKGROUND_Google", _build_caltech101, ("caltech",)),
    DatasetSpec("cub200", "CUB-200", 200, 5_994, 224,
                "<data_dir>/CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,"
                "classes.txt,images/<class>/*.jpg}, the official CUB-200-2011 layout",
                _build_cub200, ("cub", "cub2002011")),
    DatasetSpec("aircraft", "Aircraft", 100, 6_667, 224,
                "<data_dir>/fgvc-aircraft-2013b/data/{variants.txt,images_variant_trainval.txt,"
                "images_variant_test.txt,images/*.jpg}, the official FGVC-Aircraft 2013b layout",
                _build_aircraft, ("fgvcaircraft", "fgvcaircraft2013b")),
    DatasetSpec("flowers", "Flowers", 17, 1_088, 224,
                "<data_dir>/jpg/image_0001.jpg..image_1360.jpg (or <data_dir>/17flowers/jpg/...), "
                "Oxford 17 Flowers, 80 images per class in file order",
                _build_flowers, ("flowers17", "oxfordflowers17", "oxford17flowers")),
    DatasetSpec("landuse", "Land-Use", 21, 1_680, 224,
                "<data_dir>/UCMerced_LandUse/Images/<class>/*.tif (or <data_dir>/Images/<class>/*.tif), "
                "UC Merced Land Use", _build_landuse, ("ucmerced", "ucmercedlanduse")),
    DatasetSpec("pocus", "POCUS", 3, 1_692, 224,
                "<data_dir>/{covid,pneumonia,regular}/* image frames", _build_pocus),
    DatasetSpec("dtd", "DTD", 47, 1_880, 224,
                "<data_dir>/dtd/dtd/{images/<class>/*.jpg,labels/train1.txt,labels/test1.txt}, "
                "torchvision's DTD layout", _build_dtd),
    *(DatasetSpec(name, f"DomainNet-{name[-1]}", 345, size, 224,
                  f"<data_dir>/{domain}/<class>/*.jpg with <data_dir>/{domain}_train.txt and "
                  f"<data_dir>/{domain}_test.txt, the official DomainNet layout",
                  _build_domainnet(name), (f"domainnet{domain}",))
      for (name, domain), size in zip(DOMAINNET_DOMAINS.items(), (120_906, 50_416, 33_525))),
    DatasetSpec("imagefolder", "imagefolder", None, None, 224,
                "<data_dir>/<class>/<image> (any image type; or --dataset imagefolder:<folder>); seeded 80/20 "
                "split per class",
                _build_imagefolder),
    DatasetSpec("synthetic", "synthetic", None, None, 32,
                "generated in memory, no files (--data_dir is ignored); options as "
                "synthetic:key=value,...", None),
)
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}


def _normalise(name: str) -> str:
    return re.sub(r"[-_ ]", "", name.strip().lower())


_BY_NORMALISED: dict[str, str] = {}
for _spec in _SPECS:
    for _key in (_spec.name, _spec.title, *_spec.aliases):
        _BY_NORMALISED.setdefault(_normalise(_key), _spec.name)


def dataset_names() -> list[str]:
    """The canonical dataset names, in registry order."""
    return list(DATASETS)


def canonical_name(name: str) -> str:
    """The registry name for ``name`` (any case; '-', '_' and spaces ignored, so the paper's
    "CIFAR-10", "Land-Use" or "DomainNet-r" work). ``synthetic:OPTIONS`` gives "synthetic".
    Raises :class:`UserError` for an unknown name."""
    base, has_options, _ = str(name).partition(":")
    canonical = _BY_NORMALISED.get(_normalise(base))
    if canonical is None:
        raise UserError(f"--dataset {name}: unknown dataset; choose one of {', '.join(dataset_names())}")
    if has_options and canonical not in ("synthetic", "imagefolder"):
        raise UserError(f"--dataset {name}: only synthetic (options) and imagefolder (a folder) take "
                        f"something after ':'")
    return canonical


def imagefolder_path(name: str) -> str | None:
    """The folder of ``imagefolder:PATH`` (an own data set named with its folder, so several can
    be given at once); None for any other name, plain ``imagefolder`` (the folder is --data_dir)
    included."""
    base, _, path = str(name).partition(":")
    return path if path and _BY_NORMALISED.get(_normalise(base)) == "imagefolder" else None


def dataset_label(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The name a data set's results carry: ``imagefolder`` data sets are called by their folder's
    name (``imagefolder:/data/digits`` or ``imagefolder`` with --data_dir /data/digits: "digits"),
    so that two own folders are told apart; any other data set by ``name`` as given."""
    if canonical_name(name) != "imagefolder":
        return str(name)
    folder = imagefolder_path(name) or data_dir
    return Path(str(folder)).expanduser().resolve().name if folder else str(name)


def default_img_size(name: str) -> int:
    """The input size a dataset is used at: its spec's, or a synthetic task's own ``size``."""
    canonical = canonical_name(name)
    if canonical == "synthetic":
        from data.synthetic import parse_options

        return parse_options(str(name).partition(":")[2]).size
    return DATASETS[canonical].img_size


def small_images_note(dataset: Dataset, size: int, probe: int = 16) -> str | None:
    """A one-line note when the images of a folder data set are much smaller than the ``size``
    they are resized to (at most half of it: the median shorter side of up to ``probe`` images
    spread over the data set, read from their headers), with the --img_size that would keep
    them near their own size; None otherwise, and for data sets not read from image files."""
    from PIL import Image

    samples = getattr(dataset, "samples", None)
    if not samples:
        return None
    step = max(1, len(samples) // probe)
    sides = []
    for path, _ in samples[::step][:probe]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except Exception:  # noqa: BLE001 - an unreadable file is reported when it is loaded
            continue
    if not sides:
        return None
    side = sorted(sides)[len(sides) // 2]
    if 2 * side > size:
        return None
    own = max(32, 1 << (side - 1).bit_length())  # the power of two at or above the images' size, at least 32
    if own >= size:
        return None
    return (f"note: the images are about {side} px but are resized to {size} px (the data set's default "
            f"--img_size); --img_size {own} keeps them near their own size, about {(size / own) ** 2:.0f}x less "
            f"computation per image")


def build_dataset(name: str, root: str | os.PathLike | None, split: str, transform: Callable | None = None,
                  skip_corrupt: bool = False, seed: int = 0) -> Dataset:
    """The ``split`` ("train" or "val") of dataset ``name`` read from ``root`` (--data_dir).

    Items are ``(transform(rgb_image), label)``; with ``skip_corrupt`` a sample whose image
    cannot be read is ``None`` (use :func:`collate_skip_none`). ``seed`` fixes the seeded
    splits (Caltech-101, Flowers, Land-Use, POCUS, imagefolder); official splits ignore it.
    Raises :class:`UserError` naming the expected file or folder when the layout is wrong.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    canonical = canonical_name(name)
    spec = DATASETS[canonical]
    if canonical == "synthetic":
        from data.synthetic import build_synthetic  # written separately; imported on use

        return build_synthetic(str(name).partition(":")[2], split, transform=transform, seed=seed)
    if imagefolder_path(name) is not None:  # imagefolder:PATH names its own folder
        root = imagefolder_path(name)
    if root is None or str(root) == "":
        raise UserError(f"--dataset {spec.title}: needs --data_dir, the folder that holds {spec.layout}")
    root = Path(root).expanduser()
    where = f"--dataset {name}" if imagefolder_path(name) is not None else f"--data_dir {root}"
    if not root.exists():
        raise UserError(f"{where}: no such folder; give the folder that holds {spec.layout}")
    if not root.is_dir():
        raise UserError(f"{where}: not a folder; give the folder that holds {spec.layout}")
    try:
        return spec.build(root, split, transform, skip_corrupt, seed)
    except PermissionError as err:
        raise UserError(f"{err.filename or root}: cannot be read (permission denied)") from None

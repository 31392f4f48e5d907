"""JPEG files decoded on the training device (``--decode device``): nvJPEG on a GPU,
libjpeg-turbo through ``torchvision.io.decode_jpeg`` on the CPU.

The loading workers only read each file and check its header (:func:`device_decodable`):
a JPEG in colour (YCbCr) or greyscale, with no EXIF orientation to apply and ending in its
end-of-image marker, goes to the device as its bytes. Any other file (PNG, a CMYK JPEG, a
turned photograph, a truncated download) is decoded in the worker by
:func:`data.image_io.load_rgb`, exactly as ``--decode loader`` does, so a corrupt file is
reported (or skipped, ``--skip_corrupt``) there as always. On the device, a batch's JPEGs
are decoded in one call (a JPEG the device's decoder refuses is decoded by PIL instead, in
the training process) and every image is resized to the square training size there with
torchvision's antialiased bilinear resize on tensors (:func:`square`); ``--decode loader``
resizes with PIL's on the CPU, which rounds differently (docs/differences.md).

Nothing is cached: this is the path for data sets read from their files at every epoch
(``--cache off``), where the decoding is what limits the speed.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.image_io import ORIENTATION_TAG, CorruptImageError, load_rgb

DECODE_MODES = ("loader", "device")
_START, _END = b"\xff\xd8", b"\xff\xd9"  # a JPEG's start- and end-of-image markers


def device_decodable(data: bytes) -> bool:
    """Whether ``data`` (a file's bytes) is a JPEG that the device decodes to the pixels
    :func:`load_rgb` gives: colour (PIL mode RGB, stored as YCbCr) or greyscale, complete
    (it ends in the end-of-image marker), without an EXIF orientation other than upright
    (nvJPEG does not turn images)."""
    if len(data) < 4 or data[:2] != _START or data[-2:] != _END:
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return (image.format == "JPEG" and image.mode in ("RGB", "L")
                    and image.getexif().get(ORIENTATION_TAG, 1) not in range(2, 9))
    except Exception:  # noqa: BLE001 - anything PIL cannot parse goes to load_rgb, which names the fault
        return False


class DeviceDecoded(Dataset):
    """A data set that reads image files (``dataset``, built without a transform:
    ``samples``, ``(path, label)`` pairs, and items ``(PIL image, label)``, None for a
    corrupt file it skips) giving, per sample, ``(item, label, path)``: ``item`` the file's
    bytes as a 1-D uint8 tensor when :func:`device_decodable`, else ``dataset``'s own image
    as a ``[3, H, W]`` uint8 tensor (None where ``dataset`` gives None). :meth:`collate`
    makes its batches, each an :class:`EncodedBatch`."""

    def __init__(self, dataset: Dataset, img_size: int) -> None:
        self.dataset, self.img_size = dataset, img_size

    @property
    def samples(self) -> list:
        return self.dataset.samples

    @property
    def classes(self) -> list:
        return self.dataset.classes

    @property
    def targets(self) -> list:
        return self.dataset.targets

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        data = _jpeg_file(path)
        if data is not None and device_decodable(data):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, path
        sample = self.dataset[index]  # decoded as --decode loader does (errors, --skip_corrupt)
        return None if sample is None else (_chw(sample[0]), label, path)

    def collate(self, batch: Sequence):
        """``(EncodedBatch, labels, dropped)``: :func:`data.loading.collate_batch` with the
        images of a batch kept as they are, not stacked (their sizes differ)."""
        from data.loading import collate_batch

        return collate_batch(batch, self._combine)

    def _combine(self, samples: Sequence) -> tuple["EncodedBatch", torch.Tensor]:
        items, labels, paths = zip(*samples)
        return EncodedBatch(list(items), self.img_size, list(paths)), torch.tensor(labels)


def _jpeg_file(path: str) -> bytes | None:
    """The bytes of the file ``path`` when it starts as a JPEG does; None otherwise, or when
    it cannot be read (without reading the rest of any other file: the data set then reads it)."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(len(_START))
            return start + handle.read() if start == _START else None
    except OSError:
        return None


@dataclass
class EncodedBatch:
    """A batch as :class:`DeviceDecoded` gives it: per image, a JPEG's bytes (1-D uint8)
    or its decoded pixels (``[3, H, W]`` uint8); ``size``: the square side to resize to;
    ``paths``: the files, for errors."""

    items: list[torch.Tensor]
    size: int
    paths: list[str]

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> "EncodedBatch":
        """As it is (a DataLoader with ``pin_memory`` asks): the decoder reads the bytes
        from ordinary memory, and the few images decoded on the CPU are copied one by one."""
        return self

    def decode(self, device: torch.device) -> torch.Tensor:
        """The batch as ``[B, 3, size, size]`` uint8 on ``device``: its JPEGs decoded there
        in one call (:func:`decode_jpegs`), every image resized there (:func:`square`)."""
        images = list(self.items)
        encoded = [i for i, item in enumerate(images) if item.dim() == 1]
        if encoded:
            for i, image in zip(encoded, decode_jpegs([images[i] for i in encoded], device,
                                                      [self.paths[i] for i in encoded])):
                images[i] = image
        return torch.stack([square(image.to(device, non_blocking=True), self.size) for image in images])


def decode_jpegs(data: list[torch.Tensor], device: torch.device, paths: Sequence[str]) -> list[torch.Tensor]:
    """JPEG bytes (1-D uint8 CPU tensors, of the files ``paths``) as ``[3, H, W]`` uint8 RGB
    images on ``device``, decoded together (``torchvision.io.decode_jpeg``). When the batch
    fails (a file whose header passed but whose data the decoder refuses: a JPEG feature it
    lacks, or damage) each is decoded on its own, and one that still fails is decoded by
    :func:`load_rgb` on the CPU, as ``--decode loader`` would; only a file that fails there
    too raises :class:`CorruptImageError` naming it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image decoders in favour of TorchCodec (not a dependency)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
        images = []
        for item, path in zip(data, paths):
            try:
                images.append(decode_jpeg(item, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as err:
                images.append(_decoded_on_the_cpu(path, err, device))
        return images


def _decoded_on_the_cpu(path: str, err: RuntimeError, device: torch.device) -> torch.Tensor:
    """The file ``path`` that the device's decoder refused (``err``) decoded by :func:`load_rgb`."""
    try:
        return _chw(load_rgb(path))
    except CorruptImageError:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CorruptImageError(path, f"corrupt JPEG data (on {device}: {reason}; PIL fails too), found only when "
                                      "decoding, which --skip_corrupt cannot skip with --decode device: use --decode "
                                      "loader") from None


def _chw(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a ``[3, H, W]`` uint8 tensor (its own memory)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def square(image: torch.Tensor, size: int) -> torch.Tensor:
    """``[3, H, W]`` uint8 resized to ``[3, size, size]`` (bilinear, antialiased when
    shrinking, as torchvision's ``Resize((size, size))`` on a tensor), on its device."""
    from torchvision.transforms.v2 import functional as F

    if image.shape[-2:] == (size, size):
        return image
    return F.resize(image, [size, size], antialias=True)


class DecodedAhead:
    """The batches of ``loader`` (a DataLoader over a :class:`DeviceDecoded`) with their
    images decoded on ``device`` (:meth:`EncodedBatch.decode`) ``depth`` batches ahead, in
    a background thread (:func:`data.loading.ahead`): torchvision's GPU decoder holds the
    thread that calls it until the batch is decoded, which would keep the training process
    from queueing the model's work meanwhile. A :class:`data.loading.LoadFailure` passes
    through; an error while decoding is raised where the batch is taken."""

    def __init__(self, loader, device: torch.device, depth: int = 2) -> None:
        self.loader, self.device, self.depth = loader, device, depth

    def __len__(self) -> int:
        return len(self.loader)

    def _decoded(self):
        for batch in self.loader:
            if isinstance(batch, tuple) and isinstance(batch[0], EncodedBatch):
                batch = (batch[0].decode(self.device), *batch[1:])
            yield batch

    def __iter__(self):
        from data.loading import ahead

        return ahead(self._decoded(), self.depth)


def decoding_ahead(loader, dataset: Dataset, device: torch.device):
    """``loader`` as :class:`DecodedAhead` when it reads a :class:`DeviceDecoded` for a GPU;
    else as it is (on the CPU the training process decodes each batch when it takes it: a
    thread would only compete with the model's for the cores)."""
    if isinstance(dataset, DeviceDecoded) and device.type == "cuda":
        return DecodedAhead(loader, device)
    return loader


def device_decoded(dataset: Dataset, img_size: int, name: str) -> DeviceDecoded:
    """``dataset`` (built without a transform) for ``--decode device``; raises
    :class:`utils.UserError` naming ``--decode`` for a data set not read from image files."""
    from data.datasets import reads_files
    from utils import UserError

    if not reads_files(dataset) or not hasattr(dataset, "samples"):
        raise UserError(f"--decode device: --dataset {name} is not read from image files (CIFAR's pickles, the "
                        "synthetic set); drop --decode device")
    return DeviceDecoded(dataset, img_size)



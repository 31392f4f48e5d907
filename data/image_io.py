"""Reading one image file as an RGB ``PIL.Image``, with one error type for every way it fails.

Every file-based dataset in :mod:`data.datasets` loads its images through :func:`load_rgb`,
so a damaged download is reported the same way everywhere: a :class:`CorruptImageError`
(a :class:`utils.UserError`) naming the file, or, with ``skip_corrupt=True``, a skipped sample.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

from utils import UserError

# Extensions a class folder's images may have (compared case-insensitively); hidden files
# (.DS_Store, macOS "._IMG_0001.jpg" AppleDouble files) are skipped, and other files (README,
# .gif, .avif) are ignored with a notice (data.datasets.ignored_files_notice; docs/datasets.md).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
# The nominal value range of each greyscale mode of more than 8 bits, which PIL's own
# convert("RGB") would clip (I;16, I: everything above 255 white) or truncate (F: [0, 1]
# black); :func:`_wide_grey_to_rgb` scales them instead (docs/datasets.md).
# The version of how files become RGB uint8 pixels, part of every cache key built on decoded
# images (2: 16-bit greyscale and float images scaled by their range instead of clipped;
# 3: turned upright by their EXIF Orientation tag).
DECODING_VERSION = 3
ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 upright, 2-8 mirrored and/or turned
SIXTEEN_BIT_RANGE = (0.0, 65535.0)
FLOAT_RANGE = (0.0, 1.0)


class CorruptImageError(UserError):
    """An image file that cannot be read or decoded. ``path`` names it."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {reason}; replace or delete the file (training: or pass --skip_corrupt to "
                         "leave out unreadable images)")


def is_image_file(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS`."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode and convert one image to RGB (grayscale, palette, RGBA, CMYK,
    16-bit, 32-bit integer and floating-point images included: :func:`_wide_grey_to_rgb`),
    turned upright as its EXIF Orientation tag says (:func:`_upright`), as photo tools show it.
    Raises :class:`CorruptImageError` naming the file when it is missing, unreadable, not an
    image, or truncated."""
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise CorruptImageError(path, "no such image file") from None
    except PermissionError:
        raise CorruptImageError(path, "cannot be read (permission denied)") from None
    except IsADirectoryError:
        raise CorruptImageError(path, "is a folder, not an image file") from None
    except Image.DecompressionBombError as err:
        raise CorruptImageError(path, f"refused as a possible decompression bomb ({_first_line(err)})") from None
    except Image.UnidentifiedImageError:
        raise CorruptImageError(path, "not an image file PIL can read") from None
    except OSError as err:
        raise CorruptImageError(path, f"cannot be read ({_first_line(err)})") from None
    try:
        with image:
            upright = _upright(image)  # decodes every pixel when it turns it: truncated data fails here
            if upright.mode in ("I", "F") or upright.mode.startswith("I;16"):
                return _wide_grey_to_rgb(upright, path)
            return upright.convert("RGB")  # decodes every pixel: truncated data fails here
    except (MemoryError, CorruptImageError):
        raise
    except Exception as err:  # noqa: BLE001
        # PIL's decoders fail on damaged data with many exception types (OSError,
        # SyntaxError, ValueError, struct.error, IndexError, DecompressionBombError...):
        # all of them mean this file is not a usable image.
        raise CorruptImageError(path, f"corrupt or truncated image ({_first_line(err)})") from None


def _upright(image: Image.Image) -> Image.Image:
    """``image`` mirrored and turned as its EXIF Orientation tag (2-8) says, the tag then
    dropped; ``image`` itself when it has none or 1. The seed's loader (torchvision's
    ImageFolder) does not do this: docs/differences.md."""
    if image.getexif().get(ORIENTATION_TAG, 1) not in range(2, 9):
        return image
    return ImageOps.exif_transpose(image)


def _wide_grey_to_rgb(image: Image.Image, path: str | os.PathLike) -> Image.Image:
    """A 16-bit (I;16*), 32-bit integer (I) or floating-point (F) greyscale image as 8-bit RGB.

    Values within the mode's nominal range (0..65535 for I;16* and I, 0..1 for F) are
    scaled by that range (16-bit: value / 257, float: value * 255, rounded), so brightness
    means the same in every image; an image with values outside it is stretched from its
    own minimum to its maximum (a constant one is clipped to the range). NaN or infinite
    values are refused.
    """
    values = np.asarray(image, dtype=np.float64)  # decodes every pixel: truncated data fails here
    if not np.isfinite(values).all():
        raise CorruptImageError(path, f"mode {image.mode} image holds NaN or infinite values")
    low, high = FLOAT_RANGE if image.mode == "F" else SIXTEEN_BIT_RANGE
    if values.size:
        smallest, largest = float(values.min()), float(values.max())
        if (smallest < low or largest > high) and largest > smallest:
            low, high = smallest, largest
    scaled = np.rint((np.clip(values, low, high) - low) * (255.0 / (high - low)))
    return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:160] if text else type(err).__name__

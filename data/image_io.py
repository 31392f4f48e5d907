"""Reading one image file as an RGB ``PIL.Image``, with one error type for every way it fails.

Every file-based dataset in :mod:`data.datasets` loads its images through :func:`load_rgb`,
so a damaged download is reported the same way everywhere: a :class:`CorruptImageError`
(a :class:`utils.UserError`) naming the file, or, with ``skip_corrupt=True``, a skipped sample.
"""
from __future__ import annotations

import os

from PIL import Image

from utils import UserError

# Extensions a class folder's images may have (compared case-insensitively); other files
# (README, .DS_Store, Thumbs.db, list files) are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


class CorruptImageError(UserError):
    """An image file that cannot be read or decoded. ``path`` names it."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {reason}; replace or delete the file, or skip unreadable images")


def is_image_file(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS`."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode and convert one image to RGB (grayscale, palette, RGBA, CMYK and
    16-bit images included). Raises :class:`CorruptImageError` naming the file when it is
    missing, unreadable, not an image, or truncated."""
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise CorruptImageError(path, "no such image file") from None
    except PermissionError:
        raise CorruptImageError(path, "cannot be read (permission denied)") from None
    except IsADirectoryError:
        raise CorruptImageError(path, "is a folder, not an image file") from None
    except Image.UnidentifiedImageError:
        raise CorruptImageError(path, "not an image file PIL can read") from None
    except OSError as err:
        raise CorruptImageError(path, f"cannot be read ({_first_line(err)})") from None
    try:
        with image:
            return image.convert("RGB")  # decodes every pixel: truncated data fails here
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001
        # PIL's decoders fail on damaged data with many exception types (OSError,
        # SyntaxError, ValueError, struct.error, IndexError, DecompressionBombError...):
        # all of them mean this file is not a usable image.
        raise CorruptImageError(path, f"corrupt or truncated image ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:160] if text else type(err).__name__

"""Image and mask loading in one place: grayscale or RGB, 8 or 16 bit, masks thresholded at 128.

Every failure raises :class:`ImageReadError` naming the file; nothing is returned half-read.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageReadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_THRESHOLD = 128
MAX_IMAGE_PIXELS = 64_000_000
UPLOAD_FORMATS = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale 16-bit (or wider integer / float) data to 0..255 by its dtype range."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        top = 65535 if array.max(initial=0) > 255 else 255
        return np.clip(array.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
    finite = np.nan_to_num(array.astype(np.float64))
    if finite.max(initial=0) <= 1.0:
        finite = finite * 255.0
    return np.clip(finite, 0, 255).round().astype(np.uint8)


def _decode(path: Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(img)
            elif img.mode in ("L", "1"):
                array = np.asarray(img.convert("L"))
            else:
                array = np.asarray(img.convert("RGB"))
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"image too large ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"not a readable image ({exc})") from exc
    return _to_uint8(array)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Gray H×W → H×W×3; RGB passes through. Refuses anything else with the shape named."""
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    raise ValueError(f"expected an H×W or H×W×3 image, got shape {image.shape}")


def load_image(path: str | Path, mode: str = "RGB") -> np.ndarray:
    """Read an image as uint8: ``mode="RGB"`` gives H×W×3, ``mode="L"`` gives H×W."""
    array = _decode(Path(path))
    if mode == "L":
        return array if array.ndim == 2 else np.asarray(Image.fromarray(array).convert("L"))
    if mode == "RGB":
        return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array
    raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")


def load_mask(path: str | Path, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a pixel mask as a boolean H×W array (pixel ≥ 128 is defect).

    ``expected_shape`` is the (H, W) of the image the mask belongs to; a mask of another size is an error.
    """
    gray = load_image(path, mode="L")
    if expected_shape is not None and gray.shape != tuple(expected_shape):
        raise ImageReadError(
            path, f"mask size {gray.shape[1]}x{gray.shape[0]} differs from its image's "
            f"{expected_shape[1]}x{expected_shape[0]}"
        )
    return gray >= MASK_THRESHOLD


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageReadError(path, f"not a readable image ({exc})") from exc
    return height, width


def save_image(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 image or a boolean mask (as 0/255) to ``path``, creating its folder.

    PNGs use zlib level 1: a tenth of the default's time for files about 12% larger.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = array.astype(np.uint8) * 255 if array.dtype == np.bool_ else _to_uint8(array)
    options = {"compress_level": 1} if path.suffix.lower() == ".png" else {}
    Image.fromarray(out).save(path, **options)


class UploadRejected(ValueError):
    """Uploaded bytes that are not an accepted image; the message names the file, ``reason`` says why:
    ``empty``, ``too_large`` (over the pixel limit, or a decompression bomb), ``format``, ``not_image`` or
    ``corrupt`` (truncated or damaged)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def decode_upload(data: bytes, filename: str, max_pixels: int) -> tuple[np.ndarray, str]:
    """RGB uint8 array and file extension of uploaded image bytes (API requests, dashboard uploads). The pixel
    count is read from the header and checked before any pixel is decoded."""
    if not data:
        raise UploadRejected("empty", f"{filename}: the file is empty")
    accepted = ", ".join(UPLOAD_FORMATS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise UploadRejected("too_large", f"{filename}: {width}×{height} = {width * height} pixels is "
                                                      f"over the limit of {max_pixels}")
                if image.format not in UPLOAD_FORMATS:
                    raise UploadRejected("format", f"{filename}: {image.format} images are not accepted "
                                                   f"(accepted: {accepted})")
                image.load()
                return np.asarray(image.convert("RGB")), UPLOAD_FORMATS[image.format]
    except UnidentifiedImageError:
        raise UploadRejected("not_image", f"{filename}: not an image (accepted: {accepted})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadRejected("too_large", f"{filename}: refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, UploadRejected):
            raise
        raise UploadRejected("corrupt", f"{filename}: truncated or corrupt image ({exc})") from None

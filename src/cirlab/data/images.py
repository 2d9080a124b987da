"""Reading image files with errors that name the file and the problem, whatever the file holds.

Every image cirlab reads (gallery files, uploads, references, thumbnails, corpus images read back from shards)
goes through :func:`decode_image`, so one policy holds everywhere:

- **size**: images over ``max_pixels`` (default ``PIL.Image.MAX_IMAGE_PIXELS``) are refused before decoding
  (decompression bombs), so decoding is bounded in memory (3 bytes per pixel) and time;
- **frames**: an animated or multi-page file (GIF, APNG, WebP, TIFF) is its first frame; later frames are never
  decoded;
- **orientation**: the EXIF orientation tag is applied (a phone photo taken upright is upright);
- **modes**: everything becomes 8-bit RGB; 16-bit and 32-bit greyscale (``I;16``, ``I``) are scaled down to 8 bits
  (``convert("RGB")`` alone clips them, so a 16-bit PNG came out almost white), float images (``F``) are read as
  [0, 1] when they fit it, else clipped to [0, 255]; palette, CMYK and the rest convert as PIL converts them, and
  transparency is dropped as CLIP's reference preprocessing drops it (``convert("RGB")``);
- **files**: only regular files are opened (a named pipe or a device is refused without opening it, which could
  block forever), read through a non-blocking descriptor checked again after opening.

Extreme aspect ratios are bounded where the image is resized (``cirlab.backbones.transforms``).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps

from cirlab.io import open_regular_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image file is missing, truncated or not an image; the message names the file."""


class ImageTooLargeError(ImageReadError):
    """An image has more pixels than allowed (a decompression-bomb guard); the message names it."""


def _eight_bit(im: Image.Image) -> Image.Image:
    """Integer and float greyscale modes as 8-bit ``L``, scaled rather than clipped."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr = arr.astype(np.float32)
        finite = arr[np.isfinite(arr)]
        scale = 255.0 if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 else 1.0
        arr = np.nan_to_num(arr * scale, nan=0.0, posinf=255.0, neginf=0.0)
    else:  # I;16 variants and I: 16-bit data (a 32-bit I image with larger values is clipped to 16 bits)
        arr = np.clip(arr.astype(np.int64), 0, 65535) / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """A decoded image as upright 8-bit RGB (EXIF orientation applied, modes converted as the module says)."""
    try:
        if im.getexif().get(ExifTags.Base.Orientation, 1) not in (0, 1):  # exif_transpose copies upright images too
            im = ImageOps.exif_transpose(im)
    except Exception:  # a malformed EXIF block (any parser error): the pixels are read as stored
        pass
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _eight_bit(im)
    return im if im.mode == "RGB" else im.convert("RGB")


def decode_image(
    source: BinaryIO | bytes, name: str, max_pixels: int | None = None, draft: int | None = None
) -> Image.Image:
    """Decodes an image (its first frame) into upright RGB, refusing it before decoding when it is too large.

    Args:
        source: an open binary file or the encoded bytes.
        name: how messages name the image (a path, ``"reference image"``, ...).
        max_pixels: the largest width x height decoded; default ``PIL.Image.MAX_IMAGE_PIXELS``.
        draft: for previews: decode at a reduced scale no smaller than ``draft`` x ``draft`` where the format
            allows it (JPEG: 1/2, 1/4 or 1/8), which is much faster; ``max_pixels`` then bounds the reduced size.

    Raises:
        ImageTooLargeError: more pixels than ``max_pixels`` (or PIL's own bomb limit).
        ImageReadError: anything else that keeps the image from decoding (empty, truncated, not an image).
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, bytes | bytearray | memoryview):
        if not len(source):
            raise ImageReadError(f"{name}: cannot read image (the file is empty)")
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it; such images are refused below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                if draft is not None:
                    im.draft("RGB", (draft, draft))
                if limit is not None and im.width * im.height > limit:
                    raise ImageTooLargeError(_too_large(name, im.width, im.height, limit))
                im.load()  # the first frame only: later frames of an animation are never decoded
                return to_rgb(im)
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{name}: refusing a possible decompression bomb ({err})") from None
    except ImageReadError:
        raise
    except Exception as err:  # any decoder failure (PIL plugins raise many kinds) is the file's fault
        if source.seek(0, os.SEEK_END) == 0:
            raise ImageReadError(f"{name}: cannot read image (the file is empty)") from None
        raise ImageReadError(f"{name}: cannot read image ({err})") from None


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Opens ``path`` as an upright RGB PIL image, fully decoded (so a truncated file fails here, not later).

    Args:
        path: the image file (a regular file; pipes and devices are refused unopened).
        max_pixels: refuse images with more pixels than this before decoding them (decompression bombs: a small
            file that claims a huge size); default PIL's own limit, ``PIL.Image.MAX_IMAGE_PIXELS``.

    Raises:
        ImageReadError: naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        f = open_regular_file(path)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image file not found") from None
    except OSError as err:
        raise ImageReadError(str(err) if err.filename is None else f"{path}: cannot read image ({err})") from None
    with f:
        return decode_image(f, str(path), max_pixels)


def _too_large(name: str, width: int, height: int, limit: int) -> str:
    return (
        f"{name}: image is {width} x {height} = {width * height:,} pixels, over the limit of {limit:,} "
        "(a decompression-bomb guard, PIL.Image.MAX_IMAGE_PIXELS); refusing to decode it"
    )

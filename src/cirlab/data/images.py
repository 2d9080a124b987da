"""Reading image files with errors that name the file and the problem."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image file is missing, truncated or not an image; the message names the file."""


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Opens ``path`` as an RGB PIL image, fully decoded (so a truncated file fails here, not later).

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels than this before decoding them (decompression bombs: a small
            file that claims a huge size); default PIL's own limit, ``PIL.Image.MAX_IMAGE_PIXELS``.

    Raises:
        ImageReadError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it; such images are refused below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if limit is not None and im.width * im.height > limit:
                    raise ImageReadError(_too_large(path, im.width, im.height, limit))
                im.load()
                return im.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"{path}: refusing a possible decompression bomb ({err})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        if isinstance(err, ImageReadError):
            raise
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: cannot read image (the file is empty)") from None
        raise ImageReadError(f"{path}: cannot read image ({err})") from None


def _too_large(path: Path, width: int, height: int, limit: int) -> str:
    return (
        f"{path}: image is {width} x {height} = {width * height:,} pixels, over the limit of {limit:,} "
        "(a decompression-bomb guard, PIL.Image.MAX_IMAGE_PIXELS); refusing to decode it"
    )

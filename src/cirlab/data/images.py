"""Reading image files with errors that name the file and the problem."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image file is missing, truncated or not an image; the message names the file."""


def load_image(path: str | Path) -> Image.Image:
    """Opens ``path`` as an RGB PIL image, fully decoded (so a truncated file fails here, not later).

    Raises:
        ImageReadError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageReadError(f"{path}: cannot read image ({err})") from None

"""Image preprocessing with PIL + torch (no torchvision): optional target padding, resize, centre crop, normalise.

The transform travels with the backbone's weights (open_clip's habit): its size, mean and std are read from the
backbone's own config (``preprocessor_config.json`` for Hugging Face CLIP directories), and target padding is part
of the backbone spec (``hf-clip:openai/clip-vit-large-patch14#targetpad=1.25``, see ``cirlab.backbones``), so a
checkpoint rebuilds its backbone with the preprocessing it was trained with.

Target padding (CLIP4Cir's and SEARLE's ``targetpad``, ``src/data_utils.py`` of either repository): an image whose
longer side exceeds ``pad_ratio`` times its shorter side is padded with black, equally on both sides of the shorter
dimension, until the ratio is ``pad_ratio``; then the CLIP transform runs, so the centre crop no longer cuts off the
ends of long images (dresses, panoramas).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MAX_RESIZE_ASPECT = 4
"""Above this aspect ratio (after resizing) only the centre crop's region is resampled; see ``to_array``."""

# PIL resampling filters by the integer codes Hugging Face image processors store in their configs.
_RESAMPLE = {
    0: Image.Resampling.NEAREST,
    1: Image.Resampling.LANCZOS,
    2: Image.Resampling.BILINEAR,
    3: Image.Resampling.BICUBIC,
    4: Image.Resampling.BOX,
    5: Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class ImageTransform:
    """CLIP-style preprocessing: resize the shortest edge to ``resize_to``, centre crop ``size``, normalise.

    Attributes:
        size: side of the square crop fed to the model.
        resize_to: target of the shortest edge before cropping (CLIP uses the crop size).
        mean: per-channel mean, in [0, 1] units.
        std: per-channel std, in [0, 1] units.
        resample: PIL filter code (3 = bicubic, as CLIP).
        pad_ratio: target padding's aspect ratio (0: none; CLIP4Cir and SEARLE use 1.25).
    """

    size: int = 224
    resize_to: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = 3
    pad_ratio: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def identity(self) -> str:
        """A short stable hash of the settings, used in feature-cache keys."""
        settings: list[Any] = [self.size, self.resize_to, list(self.mean), list(self.std), self.resample]
        if self.pad_ratio:
            # Only when set, so that the keys of unpadded transforms (every cache written so far) stay the same.
            settings.append(self.pad_ratio)
        return hashlib.blake2b(json.dumps(settings).encode(), digest_size=8).hexdigest()

    def target_pad(self, image: Image.Image) -> Image.Image:
        """``image`` padded with black to aspect ratio ``pad_ratio`` when it is longer than that (else unchanged).

        An extreme strip (1 x 40000) would pad to a canvas of a billion pixels; when the canvas would hold more than
        ``MAX_RESIZE_ASPECT`` times the image's pixels, the image is first shrunk to twice the resolution the final
        resize keeps (the padded short side at ``2 * resize_to``), so padding never costs more than a few images'
        worth of memory. Ordinary photos (aspect below ``MAX_RESIZE_ASPECT * pad_ratio``) take the reference path.
        """
        w, h = image.size
        if not self.pad_ratio or max(w, h) / min(w, h) < self.pad_ratio:
            return image
        side = max(w, h) / self.pad_ratio  # the shorter side after padding
        if side * max(w, h) > MAX_RESIZE_ASPECT * w * h and side > 2 * self.resize_to:
            scale = 2 * self.resize_to / side
            resample = _RESAMPLE.get(self.resample, Image.Resampling.BICUBIC)
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
            w, h = image.size
            side = max(w, h) / self.pad_ratio
        pad_w, pad_h = max(int((side - w) / 2), 0), max(int((side - h) / 2), 0)
        padded = Image.new(image.mode, (w + 2 * pad_w, h + 2 * pad_h))
        padded.paste(image, (pad_w, pad_h))
        return padded

    def to_array(self, image: Image.Image) -> np.ndarray:
        """Pads (``pad_ratio``), resizes and crops one PIL image (:meth:`to_uint8`); returns float32
        (3, size, size), normalised."""
        arr = self.to_uint8(image).astype(np.float32) / 255.0  # (size, size, 3)
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (3, size, size)

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """Pads (``pad_ratio``), resizes and crops one PIL image; returns its uint8 pixels (size, size, 3), not yet
        normalised (:meth:`from_uint8` finishes them).

        Work and memory are bounded whatever the image's shape. CLIP's rule scales the short side to
        ``resize_to``, so a 1 x 40000 image would become 224 x 8,960,000 before the crop (gigabytes, a minute).
        When the resized long side would exceed ``MAX_RESIZE_ASPECT`` times the short side, only the region the
        centre crop keeps is resampled (``Image.resize(box=...)``: the same filter at the same sampling positions,
        equal to resizing everything and cropping up to the rounding of PIL's two-pass intermediate); other images
        take the reference path exactly. Target padding is bounded the same way (see ``target_pad``).
        """
        image = self.target_pad(image.convert("RGB"))
        w, h = image.size
        # Same size rule as CLIP's reference preprocessing: the long side is truncated, not rounded.
        short, long = min(w, h), max(w, h)
        new_short, new_long = self.resize_to, int(self.resize_to * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        resample = _RESAMPLE.get(self.resample, Image.Resampling.BICUBIC)
        if new_long > MAX_RESIZE_ASPECT * max(new_short, self.size):
            sx, sy = w / new_w, h / new_h  # source pixels per resized pixel, per axis
            box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
            image = image.resize((self.size, self.size), resample, box=box)
        else:
            if (new_w, new_h) != (w, h):
                image = image.resize((new_w, new_h), resample)
            image = image.crop((left, top, left + self.size, top + self.size))
        return np.asarray(image, dtype=np.uint8)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """Preprocesses a list of PIL images into a float32 batch (B, 3, size, size)."""
        import torch

        if not images:
            return torch.empty(0, 3, self.size, self.size)
        return torch.from_numpy(np.stack([self.to_array(im) for im in images]))

    def from_uint8(self, images: np.ndarray) -> torch.Tensor:
        """Preprocesses a uint8 batch (B, H, W, 3); square images of the model's size skip PIL entirely."""
        import torch

        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (B, H, W, 3), got shape {images.shape}")
        if images.shape[1] != self.size or images.shape[2] != self.size:  # square images need no padding
            return self([Image.fromarray(np.asarray(im)) for im in images])
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, S, S)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def to_hf_config(self) -> dict[str, Any]:
        """The settings as a ``CLIPImageProcessor`` ``preprocessor_config.json`` (readable by transformers; target
        padding, which transformers does not do, is kept under ``cirlab_pad_ratio`` when set)."""
        padding = {"cirlab_pad_ratio": self.pad_ratio} if self.pad_ratio else {}
        return {
            **padding,
            "image_processor_type": "CLIPImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"shortest_edge": self.resize_to},
            "resample": self.resample,
            "do_center_crop": True,
            "crop_size": {"height": self.size, "width": self.size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], default_size: int = 224) -> ImageTransform:
        """Reads a Hugging Face image-processor dict (``size``/``crop_size`` as ints or dicts)."""
        crop = cfg.get("crop_size", default_size)
        if isinstance(crop, dict):
            crop = crop.get("height", crop.get("shortest_edge", default_size))
        size = cfg.get("size", crop)
        if isinstance(size, dict):
            size = size.get("shortest_edge", size.get("height", crop))
        return cls(
            size=int(crop),
            resize_to=int(size),
            mean=tuple(float(x) for x in cfg.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(float(x) for x in cfg.get("image_std", OPENAI_CLIP_STD)),
            resample=int(cfg.get("resample", 3)),
            pad_ratio=float(cfg.get("cirlab_pad_ratio", 0.0)),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for configs."""
        d = asdict(self)
        d.pop("extra")
        return d

"""Diffusion pseudo-targets: a diffusers image-to-image or instruction-editing pipeline (InstructPix2Pix, SD/SD3
img2img, ...) loaded from a hub id or a local directory; diffusers is the optional extra ``diffusion``."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cirlab.config import to_dict
from cirlab.data.images import load_image
from cirlab.data.pseudo_targets.runner import PseudoRequest, PseudoTarget, PseudoTargetGenerator


@dataclass
class DiffusersConfig:
    """Settings of a diffusers pseudo-target pipeline.

    Attributes:
        pipeline: a diffusers pipeline class name (``StableDiffusionInstructPix2PixPipeline``,
            ``AutoPipelineForImage2Image``, ...); empty: the class ``model_index.json`` names, switched to its
            image-to-image variant when it takes no image.
        prompt: prompt template; ``{text}`` is the modification text.
        steps: denoising steps.
        guidance_scale: text guidance.
        image_guidance_scale: image guidance (instruction-editing pipelines only).
        strength: how far from the reference image generation starts (image-to-image pipelines only).
        image_size: the reference is resized to this square side first.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
    """

    pipeline: str = ""
    prompt: str = "{text}"
    steps: int = 30
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    strength: float = 0.75
    image_size: int = 512
    dtype: str = "float32"


class DiffusersGenerator(PseudoTargetGenerator):
    """A diffusers image-to-image or instruction-editing pipeline (loaded on first use).

    Args:
        model: a hub id (``timbrooks/instruct-pix2pix``, ``stabilityai/stable-diffusion-3-medium-diffusers``) or a
            local directory written by ``pipeline.save_pretrained``.
        config: pipeline settings.
        device: where the pipeline runs.
    """

    name = "diffusers"

    def __init__(self, model: str, config: DiffusersConfig | None = None, device: str = "cpu") -> None:
        self.model = str(model)
        self.config = config or DiffusersConfig()
        self.device = device
        self._pipe: Any = None

    def describe(self) -> dict[str, Any]:
        return {"generator": self.name, "model": self.model, **to_dict(self.config)}

    def pipeline(self) -> Any:
        """The loaded pipeline (diffusers is imported here, not at module import)."""
        if self._pipe is None:
            import torch

            from cirlab._optional import require

            diffusers = require("diffusers", extra="diffusion", purpose="diffusion pseudo-targets")
            name = self.config.pipeline or "DiffusionPipeline"
            cls = getattr(diffusers, name, None)
            if cls is None or not hasattr(cls, "from_pretrained"):
                raise ValueError(f"diffusers has no pipeline class {name!r}")
            dtype = getattr(torch, self.config.dtype)
            pipe = cls.from_pretrained(self.model, torch_dtype=dtype)
            if "image" not in inspect.signature(pipe.__call__).parameters:
                # A text-to-image checkpoint (e.g. SD3): reuse its components in the matching image-to-image pipeline.
                pipe = diffusers.AutoPipelineForImage2Image.from_pipe(pipe)
            pipe = pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe
        return self._pipe

    def call_kwargs(self) -> dict[str, Any]:
        """Arguments of the pipeline's ``__call__`` besides prompts, images and generators (only those it takes)."""
        cfg = self.config
        wanted = {
            "num_inference_steps": cfg.steps,
            "guidance_scale": cfg.guidance_scale,
            "image_guidance_scale": cfg.image_guidance_scale,
            "strength": cfg.strength,
            "output_type": "pil",
        }
        params = inspect.signature(self.pipeline().__call__).parameters
        named = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
        return {k: v for k, v in wanted.items() if k in named}

    def generate(self, requests: Sequence[PseudoRequest], seeds: Sequence[int]) -> list[PseudoTarget]:
        import torch

        if any(r.reference_path is None for r in requests):
            raise ValueError("diffusers pseudo-targets need each request's reference_path")
        pipe = self.pipeline()
        size = self.config.image_size
        images = [load_image(r.reference_path).resize((size, size)) for r in requests]
        prompts = [self.config.prompt.replace("{text}", r.text.strip()) for r in requests]
        # One generator per image: an image does not depend on the batch it was generated in.
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        out = pipe(prompt=prompts, image=images, generator=generators, **self.call_kwargs())
        return [PseudoTarget(im.convert("RGB"), {"prompt": p}) for im, p in zip(out.images, prompts, strict=True)]

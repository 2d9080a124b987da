"""OSrCIR (Tang et al., "Reason-before-Retrieve: One-Stage Reflective Chain-of-Thoughts for Training-Free Zero-Shot
Composed Image Retrieval", CVPR 2025).

Training-free and one-stage: a multimodal LLM reads the reference image and the modification text together and
writes, after describing the image and reflecting on the intended change, a target image description, which the
backbone's text encoder embeds as the query. Follows the public code (Pter61/osrcir, ``src/utils.py`` ``OSrCIR``):
the ``osrcir`` system prompt and user message (the image after the text), JSON answers whose ``Target Image
Description`` is the description (the modification text when there is none), greedy decoding (temperature 0) of at
most 1024 tokens stopping at a blank line. The reference calls GPT-4o / GPT-4-turbo through an API; here the
reasoner is the ``mllm`` family the ``mllm`` backbone serves (default ``mllm:Qwen/Qwen2.5-VL-72B-Instruct``) or
any image-text-to-text model (``hf-captioner:<hub id or dir>``), a departure forced by the API.

Every generated text is cached (``text_cache``). On the Shapes world the reasoner is a small stand-in trained on
synthetic triplets only (``cirlab.training.generators``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from cirlab.backbones.mllm import DEFAULT_MLLM
from cirlab.generation.cached import GeneratorSet
from cirlab.generation.hf import GeneratorOptions
from cirlab.generation.prompts import resolve_prompt
from cirlab.generation.sampling import SamplingConfig
from cirlab.generation.steps import generator, run_prompt, text_features
from cirlab.methods.base import CIRMethod, register_method
from cirlab.types import ImageFeatures, QueryContext, ReferenceImage


@dataclass
class OSrCIRConfig:
    """Attributes:
    reasoner: image-text-to-text model spec (``mllm:<hub id or dir>``, ``hf-captioner:<hub id or dir>``).
    prompt: a prompt name of ``cirlab.generation.prompts`` or a template (``{text}``).
    sampling: the reasoner's decoding.
    seed: sampling seed (only used when sampling).
    generator_options: dtype, device (empty: the backbone's) and batch size.
    """

    reasoner: str = f"mllm:{DEFAULT_MLLM}"
    prompt: str = "osrcir"
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=1024, stop=("\n\n",)))
    seed: int = 0
    generator_options: GeneratorOptions = field(default_factory=GeneratorOptions)


@register_method("osrcir")
class OSrCIR(CIRMethod):
    """One multimodal reasoning pass from (image, text) to a target description, retrieved by its text embedding."""

    config_class = OSrCIRConfig
    reads_reference_images = True
    generators: ClassVar[dict[str, str]] = {"reasoner": "reasoner"}

    def __init__(self, backbone, config: OSrCIRConfig | None = None) -> None:
        super().__init__(backbone, config)
        self._generators = GeneratorSet()

    def describe(self, texts: Sequence[str], images: Sequence[ReferenceImage]) -> list[str]:
        """The target description of each query."""
        c = self.config
        reasoner = generator(self._generators, c.reasoner, "reasoner", c.generator_options, self.backbone.device)
        prompt = resolve_prompt(c.prompt)
        raw = run_prompt(reasoner, prompt, c.sampling, c.seed, self.text_cache, "describe", images=images, texts=texts)
        return [prompt.answer(r[0], fallback=t) for r, t in zip(raw, texts, strict=True)]

    def compose(self, reference: ImageFeatures, texts: list[str], context: QueryContext) -> torch.Tensor:
        return F.normalize(text_features(self.backbone, self.describe(texts, context.images)), dim=-1)

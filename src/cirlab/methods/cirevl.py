"""CIReVL (Karthik et al., "Vision-by-Language for Training-Free Compositional Image Retrieval", ICLR 2024).

Training-free: a vision-language captioner describes the reference image, a language model rewrites that caption
according to the modification text ("Edited Description: ..."), and the backbone's text encoder embeds the rewrite
as the query; the gallery is the backbone's image embeddings. Follows the public code
(ExplainableML/Vision_by_Language, ``src/utils.py`` ``generate_predictions``):

- captioner: BLIP-2 FlanT5-XXL (LAVIS ``pretrain_flant5xxl``) with its prompt ``cirevl-blip``, beam search with 5
  beams, at most 30 tokens (LAVIS's generate defaults);
- rewriter: the reference calls GPT-3.5-turbo (an API, not a transformers model) at temperature 0 with at most 700
  tokens, stopping at a blank line; here any chat model (default ``Qwen/Qwen2.5-7B-Instruct``, a departure forced
  by the API) decodes greedily with the same limits. The prompt is ``cirevl-simple`` (the reference's default;
  ``cirevl-contextual`` for CIRR, ``cirevl-structural`` for CIRCO, ``cirevl-fashion`` for FashionIQ in its example
  runs), parsed as the reference parses it, falling back to the modification text;
- query: the normalised text embedding of the rewrite, as is.

Every generated text is cached (``text_cache``) under the model's identity, the prompt, the image digest and the
sampling settings, so a second evaluation runs no model. On the Shapes world the captioner and the rewriter are
small stand-ins trained on the world's corpus and synthetic triplets (``cirlab.training.generators``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from cirlab.generation.cached import GeneratorSet
from cirlab.generation.hf import GeneratorOptions
from cirlab.generation.prompts import resolve_prompt
from cirlab.generation.sampling import SamplingConfig
from cirlab.generation.steps import generator, run_prompt, text_features
from cirlab.methods.base import CIRMethod, register_method
from cirlab.types import ImageFeatures, QueryContext, ReferenceImage


@dataclass
class CIReVLConfig:
    """Attributes:
    captioner: captioner spec (``hf-captioner:<hub id or dir>``, ``mllm:<...>``).
    caption_prompt: a prompt name of ``cirlab.generation.prompts`` or a template.
    caption_sampling: the captioner's decoding.
    rewriter: rewriter spec (``hf-rewriter:<hub id or dir>``).
    rewrite_prompt: a prompt name or a template (``{caption}``, ``{text}``).
    rewrite_sampling: the rewriter's decoding.
    seed: sampling seed (only used when a step samples).
    generator_options: dtype, device (empty: the backbone's) and batch size of both models.
    """

    captioner: str = "hf-captioner:Salesforce/blip2-flan-t5-xxl"
    caption_prompt: str = "cirevl-blip"
    caption_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_beams=5, max_new_tokens=30))
    rewriter: str = "hf-rewriter:Qwen/Qwen2.5-7B-Instruct"
    rewrite_prompt: str = "cirevl-simple"
    rewrite_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=700, stop=("\n\n",)))
    seed: int = 0
    generator_options: GeneratorOptions = field(default_factory=GeneratorOptions)


@register_method("cirevl")
class CIReVL(CIRMethod):
    """Caption, rewrite with a language model, retrieve with the rewrite's text embedding."""

    config_class = CIReVLConfig
    reads_reference_images = True
    generators: ClassVar[dict[str, str]] = {"captioner": "captioner", "rewriter": "rewriter"}

    def __init__(self, backbone, config: CIReVLConfig | None = None) -> None:
        super().__init__(backbone, config)
        self._generators = GeneratorSet()

    def describe(self, texts: Sequence[str], images: Sequence[ReferenceImage]) -> list[str]:
        """The target description of each query (the rewrite of its reference image's caption)."""
        c = self.config
        captioner = generator(self._generators, c.captioner, "captioner", c.generator_options, self.backbone.device)
        rewriter = generator(self._generators, c.rewriter, "rewriter", c.generator_options, self.backbone.device)
        caption_prompt, rewrite_prompt = resolve_prompt(c.caption_prompt), resolve_prompt(c.rewrite_prompt)
        raw = run_prompt(
            captioner, caption_prompt, c.caption_sampling, c.seed, self.text_cache, "caption", images=images
        )
        captions = [caption_prompt.answer(r[0], "") for r in raw]
        rewrites = run_prompt(
            rewriter,
            rewrite_prompt,
            c.rewrite_sampling,
            c.seed,
            self.text_cache,
            "rewrite",
            captions=captions,
            texts=texts,
        )
        return [rewrite_prompt.answer(r[0], fallback=t) for r, t in zip(rewrites, texts, strict=True)]

    def compose(self, reference: ImageFeatures, texts: list[str], context: QueryContext) -> torch.Tensor:
        return F.normalize(text_features(self.backbone, self.describe(texts, context.images)), dim=-1)

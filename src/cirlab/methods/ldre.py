"""LDRE (Yang et al., "LDRE: LLM-based Divergent Reasoning and Ensemble for Zero-Shot Composed Image Retrieval",
SIGIR 2024).

Training-free: a captioner samples several diverse ("dense") captions of the reference image, a language model
edits each according to the modification text ("divergent reasoning"), and the query is an ensemble of the edited
captions' text embeddings. Follows the public code (yzy-bupt/LDRE):

- captions (``src/dense_caption_generator.py``): BLIP-2 OPT-6.7B fine-tuned on COCO (LAVIS
  ``caption_coco_opt6.7b``), nucleus sampling (top-p 0.9, temperature 1), 15 captions of at most 30 tokens, no
  prompt. LAVIS drew them with 5 beams per sample, which transformers' beam sampling cannot return 15 of; here each
  caption is a plain nucleus sample (``num_beams`` = 1), the one departure of this step;
- edits (``src/reasoning_and_editing.py``): GPT-3.5-turbo with the ``ldre`` system and user messages, one call per
  caption at the API's default temperature (1); here any chat model (default ``Qwen/Qwen2.5-7B-Instruct``, forced
  by the API) samples at temperature 1;
- ensemble (``src/divergent_caption_ensemble.py``, ``use_adaptive_ensemble``): ``relevance`` weights edited caption
  i by a softmax (temperature 0.04) of the summed 5 largest drops in gallery similarity from reference caption i to
  edited caption i, normalised by their maximum, and sums the normalised edited-caption embeddings
  (``generation.steps.relevance_weights``). The reference pools these scores over all queries of a split, giving one
  weight per caption index for the whole split; a query here is weighted by its own captions only, so it depends
  on nothing but itself (a departure: the index composes one query at a time). ``mean`` averages the raw text
  embeddings, as the reference's CIRR path does.

The ensemble reads the gallery (``reads_gallery``). Every generated text is cached (``text_cache``). On the Shapes
world the captioner and the rewriter are small stand-ins trained on the world's corpus and synthetic triplets
(``cirlab.training.generators``).
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
from cirlab.generation.steps import generator, relevance_weights, run_prompt, text_features
from cirlab.methods.base import CIRMethod, register_method
from cirlab.types import ImageFeatures, QueryContext, ReferenceImage

ENSEMBLES = ("relevance", "mean")


@dataclass
class LDREConfig:
    """Attributes:
    captioner: captioner spec (``hf-captioner:<hub id or dir>``, ``mllm:<...>``).
    caption_prompt: a prompt name of ``cirlab.generation.prompts`` or a template (``none``: no prompt).
    caption_sampling: the captioner's decoding; ``num_return_sequences`` is the number of captions.
    rewriter: rewriter spec (``hf-rewriter:<hub id or dir>``).
    rewrite_prompt: a prompt name or a template (``{caption}``, ``{text}``).
    rewrite_sampling: the rewriter's decoding (one edit per caption).
    ensemble: ``relevance`` (LDRE's weighted ensemble) or ``mean``.
    relevance_topk: similarity drops summed per edited caption.
    relevance_temperature: softmax temperature of the ensemble weights.
    seed: sampling seed.
    generator_options: dtype, device (empty: the backbone's) and batch size of both models.
    """

    captioner: str = "hf-captioner:Salesforce/blip2-opt-6.7b-coco"
    caption_prompt: str = "none"
    caption_sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(do_sample=True, top_p=0.9, num_return_sequences=15, max_new_tokens=30)
    )
    rewriter: str = "hf-rewriter:Qwen/Qwen2.5-7B-Instruct"
    rewrite_prompt: str = "ldre"
    rewrite_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(do_sample=True, max_new_tokens=128))
    ensemble: str = "relevance"
    relevance_topk: int = 5
    relevance_temperature: float = 0.04
    seed: int = 0
    generator_options: GeneratorOptions = field(default_factory=GeneratorOptions)

    def __post_init__(self) -> None:
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {self.ensemble!r}")
        if self.relevance_topk < 1 or self.relevance_temperature <= 0:
            raise ValueError("relevance_topk must be >= 1 and relevance_temperature > 0")


@register_method("ldre")
class LDRE(CIRMethod):
    """Several captions, one edit each, a relevance-weighted ensemble of the edits' text embeddings."""

    config_class = LDREConfig
    reads_reference_images = True
    reads_gallery = True
    generators: ClassVar[dict[str, str]] = {"captioner": "captioner", "rewriter": "rewriter"}

    def __init__(self, backbone, config: LDREConfig | None = None) -> None:
        super().__init__(backbone, config)
        self._generators = GeneratorSet()

    def describe(
        self, texts: Sequence[str], images: Sequence[ReferenceImage]
    ) -> tuple[list[list[str]], list[list[str]]]:
        """Per query, the reference captions and their edits (``num_return_sequences`` of each)."""
        c = self.config
        captioner = generator(self._generators, c.captioner, "captioner", c.generator_options, self.backbone.device)
        rewriter = generator(self._generators, c.rewriter, "rewriter", c.generator_options, self.backbone.device)
        caption_prompt, rewrite_prompt = resolve_prompt(c.caption_prompt), resolve_prompt(c.rewrite_prompt)
        raw = run_prompt(
            captioner, caption_prompt, c.caption_sampling, c.seed, self.text_cache, "caption", images=images
        )
        captions = [[caption_prompt.answer(x, "") for x in group] for group in raw]
        n = c.caption_sampling.num_return_sequences
        flat_texts = [t for t in texts for _ in range(n)]
        edits = run_prompt(
            rewriter,
            rewrite_prompt,
            c.rewrite_sampling,
            c.seed,
            self.text_cache,
            "rewrite",
            captions=[x for group in captions for x in group],
            texts=flat_texts,
        )
        flat = [rewrite_prompt.answer(r[0], fallback=t) for r, t in zip(edits, flat_texts, strict=True)]
        return captions, [flat[i * n : (i + 1) * n] for i in range(len(texts))]

    def compose(self, reference: ImageFeatures, texts: list[str], context: QueryContext) -> torch.Tensor:
        captions, edits = self.describe(texts, context.images)
        b, n = len(texts), self.config.caption_sampling.num_return_sequences
        edited = text_features(self.backbone, [x for group in edits for x in group]).reshape(b, n, -1)  # (B, n, d)
        if self.config.ensemble == "mean":
            return F.normalize(edited.mean(dim=1), dim=-1)
        edited = F.normalize(edited, dim=-1)
        before = F.normalize(text_features(self.backbone, [x for group in captions for x in group]), dim=-1)
        weights = relevance_weights(
            edited,
            before.reshape(b, n, -1),
            context.gallery,
            self.config.relevance_topk,
            self.config.relevance_temperature,
        )  # (B, n)
        return F.normalize((weights.unsqueeze(-1) * edited).sum(dim=1), dim=-1)

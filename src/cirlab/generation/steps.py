"""The steps the generative methods share: run a prompt over images or texts through the cache, encode the
resulting descriptions with the backbone's text encoder, and LDRE's relevance-weighted ensemble."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cirlab.generation.cache import TextCache
from cirlab.generation.cached import GeneratorSet, generate_cached
from cirlab.generation.hf import GeneratorOptions
from cirlab.generation.prompts import Prompt
from cirlab.generation.sampling import SamplingConfig
from cirlab.types import ReferenceImage

TEXT_BATCH = 256
GALLERY_CHUNK = 16384


def generator(
    generators: GeneratorSet, spec: str, role: str, options: GeneratorOptions, device: torch.device | str
) -> Any:
    """The generator of ``spec`` for ``role``; an unset ``options.device`` means ``device`` (the backbone's)."""
    if not options.device:
        options = dataclasses.replace(options, device=str(device))
    return generators.get(spec, role, options)


def run_prompt(
    model: Any,
    prompt: Prompt,
    sampling: SamplingConfig,
    seed: int,
    cache: TextCache,
    kind: str,
    *,
    images: Sequence[ReferenceImage] | None = None,
    captions: Sequence[str] | None = None,
    texts: Sequence[str] | None = None,
) -> list[list[str]]:
    """Raw answers (``num_return_sequences`` per input) of ``prompt`` filled with each input's image, caption and
    text (the given ones; all of the same length)."""
    given = [x for x in (images, captions, texts) if x is not None]
    if not given or len({len(x) for x in given}) != 1:
        raise ValueError("run_prompt needs inputs of one length")
    requests = [
        prompt.request(
            caption=captions[i] if captions is not None else "",
            text=texts[i] if texts is not None else "",
            image=images[i] if images is not None else None,
        )
        for i in range(len(given[0]))
    ]
    return generate_cached(model, requests, sampling, seed, cache, kind)


@torch.no_grad()
def text_features(backbone: Any, texts: Sequence[str]) -> torch.Tensor:
    """The backbone's projected text embeddings (B, d), not normalised, float32, in batches."""
    out = [
        backbone.encode_text(backbone.tokenize(list(texts[s : s + TEXT_BATCH]))).embeds.float()
        for s in range(0, len(texts), TEXT_BATCH)
    ]
    return torch.cat(out) if out else torch.empty(0, int(backbone.embed_dim))


@torch.no_grad()
def relevance_weights(
    edited: torch.Tensor, reference: torch.Tensor, gallery: torch.Tensor | np.ndarray, topk: int, temperature: float
) -> torch.Tensor:
    """LDRE's ensemble weights of a query's edited captions (its ``divergent_caption_ensemble``).

    For edited caption i of a query, the score is the sum of the ``topk`` largest drops in gallery similarity from
    its reference caption to it (``relu(s(ref_i, g) - s(edit_i, g))`` over gallery items g); the weights are a
    softmax over i of the scores divided by their maximum and by ``temperature``.

    Args:
        edited: L2-normalised features of the edited captions (B, n, d).
        reference: L2-normalised features of the reference captions they were edited from (B, n, d).
        gallery: L2-normalised gallery embeddings (N, d), a tensor or a (memory-mapped) array read in chunks.
        topk: drops summed per caption.
        temperature: softmax temperature over the normalised scores.

    Returns:
        Weights (B, n) summing to 1 per query (uniform when no caption lowers any similarity).
    """
    b, n, d = edited.shape
    pair = torch.stack([reference, edited], dim=2).reshape(b * n * 2, d)  # (B n 2, d): (reference, edited) rows
    best = edited.new_zeros(b * n, 0)
    for start in range(0, int(gallery.shape[0]), GALLERY_CHUNK):
        block = gallery[start : start + GALLERY_CHUNK]
        if not isinstance(block, torch.Tensor):
            block = torch.from_numpy(np.array(block, dtype=np.float32))  # a copy: memory-mapped rows are read-only
        sims = (pair @ block.to(pair.device, pair.dtype).t()).reshape(b * n, 2, -1)  # (B n, 2, chunk)
        drops = (sims[:, 0] - sims[:, 1]).clamp(min=0)  # (B n, chunk)
        both = torch.cat([best, drops], dim=1)
        best = both.topk(min(topk, both.shape[1]), dim=1).values
    scores = best.sum(dim=1).reshape(b, n)  # (B, n)
    top = scores.max(dim=1, keepdim=True).values  # (B, 1)
    uniform = torch.full_like(scores, 1.0 / n)
    weights = torch.softmax(scores / top.clamp(min=1e-12) / temperature, dim=1)
    return torch.where(top > 0, weights, uniform)

"""Training batches as pure functions of the step, read from cached image features (or, for comparison and for
methods that fine-tune the image encoder, from pixels encoded on the fly).

Determinism: the examples of step ``s`` come from a permutation seeded by ``(seed, epoch)``, so a resumed run
replays exactly the batches an uninterrupted run would have seen, without saving any data-loader state.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cirlab.distributed import World
from cirlab.features.table import FeatureTable
from cirlab.methods.base import DATA_KINDS
from cirlab.types import ImageFeatures

__all__ = ["FeatureTable", "PixelTable", "Triplet", "epoch_indices", "make_batch_fn", "mine_hard_negatives"]

ENCODED_ONCE_MAX_BYTES = 2 << 30
"""The most memory ``PixelTable.encoded_once`` gives the features of a stage's images (2 GiB)."""


@dataclass
class PixelTable:
    """Images encoded on every access (the slow path: for fine-tuned image encoders and for benchmarks)."""

    names: list[str]
    pixels: Callable[[torch.Tensor], torch.Tensor]
    encode: Callable[[torch.Tensor], ImageFeatures]

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, names: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.index[n] for n in names], dtype=torch.long)

    def gather(self, rows: torch.Tensor) -> ImageFeatures:
        return self.encode(self.pixels(rows))

    @torch.no_grad()
    def encoded_once(
        self, reads: int, batch_size: int = 256, max_bytes: int = ENCODED_ONCE_MAX_BYTES
    ) -> FeatureTable | PixelTable:
        """Every image encoded now, as a ``FeatureTable``, for a stage whose image encoder does not train.

        Args:
            reads: how many image reads the stage will make; encoding every image is only worth it when the table
                holds fewer images than that.
            batch_size: images per encoder call.
            max_bytes: the most memory the features may take (checked after the first batch).

        Returns:
            The features, or this table itself when encoding everything would cost more encodings or memory.
        """
        n = len(self)
        if n == 0 or n > reads:
            return self
        embeds: list[torch.Tensor] = []
        tokens: list[torch.Tensor] = []
        for start in range(0, n, batch_size):
            feats = self.gather(torch.arange(start, min(start + batch_size, n)))
            if start == 0:
                row_bytes = (feats.embeds[:1].numel() + feats.tokens[:1].numel()) * feats.embeds.element_size()
                if row_bytes * n > max_bytes:
                    return self
            embeds.append(feats.embeds.detach().cpu())
            tokens.append(feats.tokens.detach().cpu())
        token_table = torch.cat(tokens) if tokens[0].numel() else None
        return FeatureTable(list(self.names), torch.cat(embeds), token_table)


def epoch_indices(n: int, batch_size: int, step: int, micro: int, grad_accum: int, seed: int) -> torch.Tensor:
    """Example indices of micro-batch ``micro`` of ``step``: consecutive slices of per-epoch permutations.

    A batch holds ``min(batch_size, n)`` examples; one that straddles an epoch boundary takes the end of one
    permutation and the start of the next.
    """
    if n <= 0:
        raise ValueError("cannot sample batches from an empty training set")
    b = min(batch_size, n)
    start = (step * grad_accum + micro) * b
    perms: dict[int, torch.Tensor] = {}
    out = []
    for position in range(start, start + b):
        epoch, offset = divmod(position, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perms[epoch][offset]))
    return torch.tensor(out, dtype=torch.long)


def _choice_rng(seed: int, step: int, micro: int) -> random.Random:
    return random.Random(f"{seed}/{step}/{micro}")


@dataclass
class Triplet:
    """A (reference image, modification text, target image) training example; images by name.

    ``texts``, when given, are the text's alternatives, one drawn at random per step (FashionIQ's four caption
    combinations, as CLIP4Cir trains).
    """

    reference: str
    text: str
    target: str
    texts: tuple[str, ...] = ()


def make_batch_fn(
    kind: str,
    batch_size: int,
    seed: int,
    grad_accum: int = 1,
    images: FeatureTable | PixelTable | None = None,
    captions: Sequence[Sequence[str]] | None = None,
    triplets: Sequence[Triplet] | None = None,
    hard_negatives: Callable[[torch.Tensor], ImageFeatures] | None = None,
    world: World | None = None,
) -> Callable[[int, int], dict[str, Any]]:
    """Builds ``(step, micro) -> batch`` for a stage's data kind.

    With several processes (``world``), each returns its ``world.local_slice`` of the global micro-batch of
    ``batch_size`` examples; captions are drawn for the whole global batch first, so the processes together see
    exactly the examples one process would.

    Args:
        kind: the stage's data kind; its batch shape (``DATA_KINDS``: ``images``, ``pairs``, ``captions`` or
            ``triplets``) decides what a batch holds.
        batch_size: examples per micro-batch.
        seed: data-order seed.
        grad_accum: micro-batches per step (so consecutive micro-batches take consecutive slices).
        images: image features for ``images``/``pairs`` (row i = image i) and for triplets (looked up by name).
        captions: per image, its captions (``pairs``; one is drawn per step) or, for ``captions``, the corpus.
        triplets: training triplets.
        hard_negatives: optional ``target rows (B,) -> ImageFeatures (B, k)`` for mined negatives.
        world: this process's rank and the number of processes (default: one process).
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"unknown data kind {kind!r}; known: {', '.join(DATA_KINDS)}")
    shape = DATA_KINDS[kind]
    share = world or World()

    def indices(n: int, step: int, micro: int) -> tuple[torch.Tensor, slice]:
        idx = epoch_indices(n, batch_size, step, micro, grad_accum, seed)  # (B,) the global micro-batch
        return idx, share.local_slice(len(idx))

    def images_batch(step: int, micro: int) -> dict[str, Any]:
        idx, local = indices(len(images), step, micro)
        return {"image": images.gather(idx[local]), "rows": idx[local]}

    def pairs_batch(step: int, micro: int) -> dict[str, Any]:
        rng = _choice_rng(seed, step, micro)
        idx, local = indices(len(images), step, micro)
        drawn = [rng.choice(captions[i]) for i in idx.tolist()]
        return {"image": images.gather(idx[local]), "caption": drawn[local]}

    def captions_batch(step: int, micro: int) -> dict[str, Any]:
        # The corpus may hold one caption per entry or several phrasings to draw from.
        rng = _choice_rng(seed, step, micro)
        idx, local = indices(len(captions), step, micro)
        picked = [captions[i] for i in idx.tolist()]
        return {"caption": [c if isinstance(c, str) else rng.choice(c) for c in picked][local]}

    def triplets_batch(step: int, micro: int) -> dict[str, Any]:
        rng = _choice_rng(seed, step, micro)
        idx, local = indices(len(triplets), step, micro)
        # Drawn for the whole global batch, so that the processes together see what one process would.
        texts = [rng.choice(t.texts) if t.texts else t.text for t in (triplets[i] for i in idx.tolist())]
        chosen = [triplets[i] for i in idx[local].tolist()]
        target_rows = images.rows([t.target for t in chosen])
        out = {
            "ref": images.gather(images.rows([t.reference for t in chosen])),
            "text": texts[local],
            "target": images.gather(target_rows),
            "target_rows": target_rows,
        }
        if hard_negatives is not None:
            out["hard_negatives"] = hard_negatives(target_rows)
        return out

    builders = {"images": images_batch, "pairs": pairs_batch, "captions": captions_batch, "triplets": triplets_batch}
    return builders[shape]


def mine_hard_negatives(embeds: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """For every row, the ``k`` nearest other rows by cosine similarity (N, k), the row itself excluded."""
    normed = torch.nn.functional.normalize(embeds.float(), dim=-1)
    out = []
    for start in range(0, len(normed), chunk):
        sims = normed[start : start + chunk] @ normed.t()  # (c, N)
        sims[torch.arange(sims.shape[0]), torch.arange(start, start + sims.shape[0])] = -np.inf
        out.append(sims.topk(min(k, len(normed) - 1), dim=1).indices)
    return torch.cat(out)

"""Contrastive pretraining of the Shapes world's own tiny CLIP on its image-caption corpus (no triplets).

The model is a ``transformers.CLIPModel`` (via ``build_small_clip``) with a byte-level BPE trained on the corpus
captions; it is trained by the shared loop with CLIP's symmetric InfoNCE and learnable temperature, a fresh caption
phrasing drawn at every step, and saved as a directory that loads as ``hf-clip:<dir>``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cirlab.backbones.hf_clip import HFCLIPBackbone
from cirlab.backbones.tiny import SmallCLIPConfig, build_small_clip
from cirlab.distributed import current_world
from cirlab.modules.losses import gather_with_grad
from cirlab.training.data import epoch_indices
from cirlab.training.loop import TrainConfig, train


def shapes_clip_model() -> SmallCLIPConfig:
    """The Shapes CLIP: 64 px, patch 8 (64 tokens), 2+2 layers of width 128 (SHAPES-CALIBRATION.md's pick)."""
    return SmallCLIPConfig(
        image_size=64,
        patch_size=8,
        vision_width=128,
        vision_layers=2,
        vision_heads=4,
        text_width=128,
        text_layers=2,
        text_heads=4,
        embed_dim=128,
        context_length=64,
        vocab_size=1000,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )


@dataclass
class CLIPPretrainConfig:
    """Attributes: model: architecture. train: loop settings. eval_scenes: held-out scenes for the retrieval eval."""

    model: SmallCLIPConfig = field(default_factory=shapes_clip_model)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=800, batch_size=128, lr=5e-4, weight_decay=0.1, log_every=25)
    )
    eval_scenes: int = 1000


def clip_loss(backbone: HFCLIPBackbone, pixels: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
    """CLIP's symmetric InfoNCE with the model's learnable temperature (clamped at 100 as in CLIP)."""
    v = F.normalize(backbone.encode_image(pixels).embeds, dim=-1)  # (B, d)
    t = F.normalize(backbone.encode_text(backbone.tokenize(captions)).embeds, dim=-1)  # (B, d)
    scale = backbone.logit_scale.exp().clamp(max=100.0)
    v_all, offset = gather_with_grad(v)  # (G, d): every process's share of the global batch (G = B in one process)
    if v_all is v:
        logits = scale * v @ t.t()  # (B, B)
        labels = torch.arange(len(captions))
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    else:
        t_all = gather_with_grad(t)[0]  # (G, d)
        labels = torch.arange(len(captions), device=v.device) + offset
        loss = 0.5 * (F.cross_entropy(scale * v @ t_all.t(), labels) + F.cross_entropy(scale * t @ v_all.t(), labels))
    return {"loss": loss, "scale": scale.detach()}


@torch.no_grad()
def retrieval_recall(
    backbone: HFCLIPBackbone, images: np.ndarray, captions: list[str], ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Image->text and text->image Recall@K (%); a hit is any item with exactly the query's caption."""
    backbone.eval()
    v = torch.cat(
        [
            backbone.encode_image(backbone.image_transform.from_uint8(images[i : i + 256])).embeds
            for i in range(0, len(images), 256)
        ]
    )
    t = torch.cat([backbone.encode_text(captions[i : i + 256]).embeds for i in range(0, len(captions), 256)])
    sims = F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).t()  # (N, N): image i vs caption j
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    label = torch.tensor([ids[c] for c in captions])
    same = label[:, None] == label[None, :]  # (N, N): caption of i equals caption of j
    out = {}
    for k in ks:
        top_t = sims.topk(k, dim=1).indices  # images -> captions
        top_i = sims.t().topk(k, dim=1).indices  # captions -> images
        out[f"i2t_r{k}"] = 100.0 * same.gather(1, top_t).any(dim=1).float().mean().item()
        out[f"t2i_r{k}"] = 100.0 * same.gather(1, top_i).any(dim=1).float().mean().item()
    return out


def pretrain_clip(
    images: np.ndarray,
    caption_fn: Any,
    corpus_texts: list[str],
    cfg: CLIPPretrainConfig,
    out_dir: str | Path,
    eval_images: np.ndarray | None = None,
    eval_captions: list[str] | None = None,
    seed: int = 0,
) -> tuple[HFCLIPBackbone, dict[str, float]]:
    """Builds and trains a small CLIP; saves it to ``out_dir/backbone`` and returns it with its eval metrics.

    Args:
        images: uint8 corpus images (N, H, W, 3) (may be memory-mapped).
        caption_fn: ``(index, rng) -> str``, a fresh phrasing of image ``index``.
        corpus_texts: captions used to train the tokenizer.
        cfg: model and loop settings.
        out_dir: run directory (``trainer_state.pt`` for resume, ``metrics.csv``, ``backbone/``).
        eval_images / eval_captions: held-out scenes and their canonical captions for the retrieval eval.
        seed: initialisation seed.
    """
    out_dir = Path(out_dir)
    backbone = build_small_clip(cfg.model, corpus_texts, seed=seed, name="shapes-clip")
    tc = cfg.train

    # Under torchrun each process reads its share of the global batch (the captions are drawn for the whole
    # batch, so the examples are those one process would see).
    share = current_world()

    def batch_fn(step: int, micro: int) -> tuple[torch.Tensor, list[str]]:
        idx = epoch_indices(len(images), tc.batch_size, step, micro, tc.grad_accum, tc.seed).numpy()
        rng = random.Random(f"clip/{tc.seed}/{step}/{micro}")
        captions = [caption_fn(int(i), rng) for i in idx]
        local = share.local_slice(len(idx))
        idx, captions = idx[local], captions[local]
        pixels = backbone.image_transform.from_uint8(np.asarray(images[np.sort(idx)]))
        order = np.argsort(np.argsort(idx))  # undo the sort used for the memory-mapped read
        return pixels[torch.from_numpy(order)], captions

    def eval_fn() -> dict[str, float]:
        if eval_images is None or eval_captions is None:
            return {}
        return retrieval_recall(backbone, eval_images, eval_captions)

    def save(path: Path) -> None:
        backbone.save_pretrained(path)

    result = train(
        backbone,
        list(backbone.parameters()),
        batch_fn,
        lambda b: clip_loss(backbone, *b),
        tc,
        out_dir,
        eval_fn=eval_fn if eval_images is not None else None,
        select_metric="i2t_r1" if eval_images is not None else None,
        save_fn=save,
        description="shapes CLIP",
    )
    best = HFCLIPBackbone.from_pretrained(str(out_dir / "best"))
    return best.freeze(), result.best_metrics

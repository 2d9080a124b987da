"""Contrastive pretraining of the Shapes world's own CLIP, the way real CLIPs learn: alt-text and hard negatives.

The model is a ``transformers.CLIPModel`` (``build_small_clip``) with a byte-level BPE trained on alt-text
captions. Each batch (``data.shapes.pretraining``) holds groups of near-duplicate scenes drawn fresh from the scene
distribution (held-out combinations excluded), each with an alt-text caption, complete or partial; the loss is
CLIP's symmetric InfoNCE with its learnable temperature, counting every caption true of an image as a positive
(``modules.losses.multi_positive_nce``). The shared loop trains it; the result is a directory that loads as
``hf-clip:<dir>``. Pretraining reads no benchmark triplet, no modification text and no world file: the same
backbone serves every world built with the same scene vocabulary, held-out combinations and renderer.
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cirlab.backbones.hf_clip import HFCLIPBackbone
from cirlab.backbones.shapes_clip import RECORD_FILE, file_digest
from cirlab.backbones.tiny import SmallCLIPConfig, build_small_clip
from cirlab.config import to_dict
from cirlab.data.shapes.alttext import AltTextConfig, alt_caption
from cirlab.data.shapes.captions import eval_caption
from cirlab.data.shapes.pretraining import pretrain_batch
from cirlab.data.shapes.render import render_batch
from cirlab.data.shapes.world import RenderConfig, SceneConfig, combo_filter, sample_scene
from cirlab.distributed import current_world
from cirlab.io import atomic_write_json, create_temp_dir, replace_dir
from cirlab.modules.losses import multi_positive_nce
from cirlab.training.loop import TrainConfig, train


def shapes_clip_model() -> SmallCLIPConfig:
    """The Shapes CLIP's architecture (64 px; see docs/RESULTS.md for how it was chosen)."""
    return SmallCLIPConfig(
        image_size=64,
        patch_size=21,
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
        vision_position_init=0.5,
    )


@dataclass
class CLIPPretrainConfig:
    """How the Shapes CLIP is pretrained.

    Attributes:
        model: architecture.
        train: loop settings (``batch_size`` scenes per step).
        group: near-duplicate scenes per group in a batch (1: no hard negatives).
        captions: the alt-text caption distribution.
        scene: the scene distribution (its held-out combinations are never drawn).
        render: the renderer (must be the worlds' own).
        tokenizer_texts: captions drawn to train the BPE tokenizer.
        eval_scenes: fresh held-out scenes for the retrieval check that selects the best checkpoint.
        gap_logit_scale: the exported CLIP is used with the modality gap (``HFCLIPBackbone``) that brings its
            logit scale to this value, real CLIP's 100, so its image-text cosines are as compressed as a real
            CLIP's must be (``modality_gap_for``); recorded in ``PRETRAINED.json``. Not trained: the gap leaves
            every image-text ranking as it is. None: no gap.
    """

    model: SmallCLIPConfig = field(default_factory=shapes_clip_model)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=3000, batch_size=256, lr=5e-4, weight_decay=0.1, eval_every=500, log_every=50
        )
    )
    group: int = 4
    captions: AltTextConfig = field(default_factory=AltTextConfig)
    scene: SceneConfig = field(default_factory=SceneConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    tokenizer_texts: int = 20000
    eval_scenes: int = 1000
    gap_logit_scale: float | None = 100.0


def modality_gap_for(logit_scale: float, target: float | None) -> float:
    """The modality gap ``C`` that lifts a CLIP's ``logit_scale`` (exp'd) to ``target``: sqrt(1 + C**2) is their
    ratio (``HFCLIPBackbone``). 0 when ``target`` is None or not above the scale.

    Example:
        The shipped Shapes CLIP ends at 30.66, so C = sqrt((100 / 30.66) ** 2 - 1) = 3.10.
    """
    if target is None or target <= logit_scale:
        return 0.0
    return math.sqrt((target / logit_scale) ** 2 - 1.0)


def tokenizer_corpus(cfg: CLIPPretrainConfig, seed: int) -> list[str]:
    """Alt-text and canonical captions of fresh scenes, for training the tokenizer."""
    rng = random.Random(f"shapes-clip-tokenizer/{seed}")
    texts = []
    for _ in range(cfg.tokenizer_texts // 2):
        scene = sample_scene(rng, cfg.scene, combo_filter(cfg.scene.heldout))
        texts += [alt_caption(scene, rng, cfg.captions)[0], eval_caption(scene)]
    return texts


def heldout_scenes(scene: SceneConfig, render: RenderConfig, n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` fresh scenes (seen combinations only, drawn apart from any pretraining batch) and canonical captions."""
    rng = random.Random(f"shapes-clip-eval/{seed}")
    scenes = [sample_scene(rng, scene, combo_filter(scene.heldout)) for _ in range(n)]
    images = render_batch([(s, rng.getrandbits(31)) for s in scenes], render)
    return images, [eval_caption(s) for s in scenes]


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
    cfg: CLIPPretrainConfig,
    out_dir: str | Path,
    seed: int = 0,
    extra_metrics: Callable[[HFCLIPBackbone], dict[str, float]] | None = None,
) -> tuple[HFCLIPBackbone, dict[str, float]]:
    """Builds and pretrains the Shapes CLIP; saves it to ``out_dir/best`` and returns it (frozen) with its metrics.

    Args:
        cfg: model, loop, batch and caption settings.
        out_dir: run directory (``trainer_state.pt`` for resume, ``metrics.csv``, ``best/``).
        seed: initialisation and data seed.
        extra_metrics: more validation metrics logged at each evaluation (e.g. the target-caption oracle on a
            world's validation split); the best checkpoint is still chosen on held-out-scene i2t R@1.
    """
    out_dir = Path(out_dir)
    backbone = build_small_clip(cfg.model, tokenizer_corpus(cfg, seed), seed=seed, name="shapes-clip")
    tc = cfg.train
    world = current_world()
    eval_images, eval_captions = heldout_scenes(cfg.scene, cfg.render, cfg.eval_scenes, seed)

    def batch_fn(step: int, micro: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        # Every process draws the whole global batch (cheap, and the truth matrix needs every caption), then
        # encodes its own share.
        size = tc.batch_size * world.size
        batch = pretrain_batch(tc.seed, step, micro, size, cfg.group, cfg.scene, cfg.render, cfg.captions)
        local = world.local_slice(size)
        pixels = backbone.image_transform.from_uint8(batch.images[local])
        return pixels, batch.captions[local], torch.from_numpy(batch.positives)

    def loss_fn(batch: tuple[torch.Tensor, list[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        pixels, captions, positives = batch
        v = F.normalize(backbone.encode_image(pixels).embeds.float(), dim=-1)  # (B, d)
        t = F.normalize(backbone.encode_text(backbone.tokenize(captions)).embeds.float(), dim=-1)  # (B, d)
        scale = backbone.logit_scale.exp().clamp(max=backbone.max_logit_scale)
        return {"loss": multi_positive_nce(v, t, positives, scale), "scale": scale.detach()}

    result = train(
        backbone,
        list(backbone.parameters()),
        batch_fn,
        loss_fn,
        tc,
        out_dir,
        eval_fn=lambda: (
            retrieval_recall(backbone, eval_images, eval_captions) | (extra_metrics(backbone) if extra_metrics else {})
        ),
        select_metric="i2t_r1",
        save_fn=backbone.save_pretrained,
        description="shapes CLIP",
    )
    best = HFCLIPBackbone.from_pretrained(str(out_dir / "best"))
    return best.freeze(), result.best_metrics


def export_pretrained(
    backbone: HFCLIPBackbone, cfg: CLIPPretrainConfig, metrics: dict[str, float], command: str, path: str | Path
) -> None:
    """Writes ``backbone`` as a shippable Shapes CLIP: the model directory plus ``PRETRAINED.json`` (the SHA-256 of
    every file, the command that made it, the modality gap it is used with, the pretraining config, the
    held-out-scene metrics, the versions).

    Written beside ``path`` and renamed into place, so a crash leaves no half-written model.
    """
    import transformers

    import cirlab

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = create_temp_dir(path.parent, f".{path.name}.")  # the umask's mode, not mkdtemp's 0o700
    try:
        backbone.save_pretrained(tmp / "model")
        files = {p.name: file_digest(p) for p in sorted((tmp / "model").iterdir()) if p.is_file()}
        # The scale without any gap the backbone was built with: the gap raised it by sqrt(1 + C**2).
        scale = float(backbone.model.logit_scale.detach().exp()) / math.hypot(1.0, backbone.modality_gap)
        record = {
            "command": command,
            "files": files,
            "modality_gap": modality_gap_for(scale, cfg.gap_logit_scale),
            "metrics": metrics,
            "config": to_dict(cfg),
            "versions": {
                "cirlab": cirlab.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
        }
        atomic_write_json(tmp / "model" / RECORD_FILE, record)
        replace_dir(tmp / "model", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""The supervised upper bound: CLIP4Cir's Combiner (Baldrati et al., "Effective conditioned and composed image
retrieval combining CLIP-based features", CVPR 2022; "Composed Image Retrieval using Contrastive Learning and
Task-oriented CLIP-based Features", TOMM 2023), trained on a benchmark's training triplets.

Known (public code, github.com/ABaldrati/CLIP4Cir):

* Stage ``finetune`` (optional, ``src/clip_fine_tune.py``): CLIP's text encoder, image encoder or both (``--encoder``;
  the README command: both) fine-tuned with the element-wise sum ``q = norm(v_ref + t)`` of the raw features,
  cross-entropy over in-batch targets at logit scale 100; AdamW, lr 2e-6, betas (0.9, 0.999), eps 1e-7.
* Stage ``combiner`` (``src/combiner.py``, ``src/combiner_train.py``): CLIP frozen; the *raw* text and image features
  each go through Linear(d, p)-ReLU-Dropout(0.5) (``p`` = ``--projection-dim``, 2560 = 4 d for RN50x4); their
  concatenation through Linear(2p, h)-ReLU-Dropout(0.5)-Linear(h, d) (``h`` = ``--hidden-dim``, 5120 = 8 d) and a
  dynamic scalar Linear(2p, h)-ReLU-Dropout(0.5)-Linear(h, 1)-Sigmoid ``lam``;
  ``q = norm(out + lam * t + (1 - lam) * v)`` (a residual over the raw features); cross-entropy over in-batch
  targets at logit scale 100; Adam at a constant lr 2e-5, no weight decay, no clipping, PyTorch's default init.
* FashionIQ training text: one of ``"c1 and c2"``, ``"c2 and c1"``, ``c1``, ``c2`` at random per step (the training
  data serves these, ``cirlab.data.fashioniq.training_captions``); validation on all three categories
  (``data.val: fashioniq/val``). Preprocessing ``targetpad`` (the backbone spec's ``#targetpad=1.25``).

Every setting is a ``CombinerConfig`` field whose default is the public code's. Departures available as fields:
``finetune: none`` (CLIP stays frozen), ``normalize_inputs`` (the combiner reads L2-normalised features), the
widths and dropout. Remaining departure: the training loop never decays biases and norm weights unless the stage
sets ``decay_all`` (stage 1's AdamW decays every parameter by 0.01 in the public code; the presets set it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.methods.base import CIRMethod, Stage, register_method
from cirlab.modules.losses import info_nce
from cirlab.modules.text import length_grouped_embeds
from cirlab.types import ImageFeatures

FINETUNE = ("none", "text", "image", "both")


@dataclass
class CombinerConfig:
    """Attributes:
    projection_dim: width of the text and image projections (0: 4 d). hidden_dim: combiner width (0: 8 d).
    dropout: dropout of every combiner layer. temperature: cross-entropy temperature (1 / logit scale).
    normalize_inputs: the combiner reads L2-normalised features (the public code: raw ones).
    finetune: stage 1 fine-tunes CLIP's ``text``, ``image`` or ``both`` encoders (``none``: no stage 1).
    """

    projection_dim: int = 0
    hidden_dim: int = 0
    dropout: float = 0.5
    temperature: float = 0.01
    normalize_inputs: bool = False
    finetune: str = "both"


@register_method("combiner")
class Combiner(CIRMethod):
    """CLIP4Cir: optional fine-tuning of CLIP with the element-wise sum, then the Combiner on frozen features."""

    config_class = CombinerConfig
    stages = (Stage("finetune", "triplets", zero_shot=False), Stage("combiner", "triplets", zero_shot=False))
    supervised = True

    def __init__(self, backbone: Any, config: CombinerConfig | None = None) -> None:
        cfg = config if config is not None else CombinerConfig()
        if not isinstance(cfg, CombinerConfig):
            raise TypeError(f"combiner: expected CombinerConfig, got {type(cfg).__name__}")
        if cfg.finetune not in FINETUNE:
            raise ValueError(f"combiner finetune must be one of {FINETUNE}, got {cfg.finetune!r}")
        # Fine-tuning must never touch the shared backbone: the method then owns a copy.
        super().__init__(copy.deepcopy(backbone) if cfg.finetune != "none" else backbone, cfg)
        self.stages = type(self).stages[1:] if cfg.finetune == "none" else type(self).stages
        d = backbone.embed_dim
        p, h, drop = cfg.projection_dim or 4 * d, cfg.hidden_dim or 8 * d, cfg.dropout
        self.text_projection = nn.Sequential(nn.Linear(d, p), nn.ReLU(), nn.Dropout(drop))
        self.image_projection = nn.Sequential(nn.Linear(d, p), nn.ReLU(), nn.Dropout(drop))
        self.combiner_layer = nn.Sequential(nn.Linear(2 * p, h), nn.ReLU(), nn.Dropout(drop))
        self.output_layer = nn.Linear(h, d)
        self.dynamic_scalar = nn.Sequential(nn.Linear(2 * p, h), nn.ReLU(), nn.Dropout(drop), nn.Linear(h, 1))
        self._stage_texts: dict[str, torch.Tensor] = {}  # the Combiner stage's text features (see below)

    @property
    def image_encoder_frozen(self) -> bool:
        """False when stage 1 fine-tunes (or fine-tuned) the image encoder: cached features are then stale."""
        return self.config.finetune in ("none", "text") and super().image_encoder_frozen

    def _inputs(self, features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        return F.normalize(features, dim=-1) if self.config.normalize_inputs else features

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """The (possibly fine-tuned) text encoder's raw embeddings (B, d), encoded in groups of similar length (the
        same embeddings for less work; stage 1's text tower was over half of its step)."""
        return length_grouped_embeds(self.backbone, texts)

    def combine(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Image and text features (B, d) -> composed query (B, d), L2-normalised."""
        v, t = self._inputs(v), self._inputs(t.to(v.device))
        joint = torch.cat([self.text_projection(t), self.image_projection(v)], dim=-1)  # (B, 2p)
        lam = torch.sigmoid(self.dynamic_scalar(joint))  # (B, 1)
        return F.normalize(self.output_layer(self.combiner_layer(joint)) + lam * t + (1 - lam) * v, dim=-1)

    def compose(self, reference: ImageFeatures, texts: list[str]) -> torch.Tensor:
        return self.combine(reference.embeds.to(self.backbone.device), self.text_features(texts))

    def _encoder_parameters(self) -> list[nn.Parameter]:
        image = list(self.backbone.image_encoder_parameters())
        image_ids = {id(q) for q in image}
        logit_scale = getattr(self.backbone, "logit_scale", None)
        text = [q for q in self.backbone.parameters() if id(q) not in image_ids and q is not logit_scale]
        return {"text": text, "image": image, "both": text + image}[self.config.finetune]

    def trainable_parameters(self, stage: str) -> list[nn.Parameter]:
        self.stage(stage)
        if stage == "finetune":
            return self._encoder_parameters()
        return [q for name, q in self.named_parameters() if not name.startswith("backbone.")]

    def prepare_stage(self, stage: str) -> None:
        super().prepare_stage(stage)
        self.mark_backbone_finetuned(stage)
        self._stage_texts = {}

    def _frozen_text_features(self, texts: list[str]) -> torch.Tensor:
        """The Combiner stage's text features (B, d), each text encoded once per stage.

        CLIP is frozen in that stage, so a text's features never change there, and encoding the same training texts
        at every step was nearly all of the stage's time (the reference encodes them per batch too; the numbers are
        the same up to float rounding). Emptied when a stage begins, so stage 1's fine-tuning is always seen.
        """
        missing = [t for t in dict.fromkeys(texts) if t not in self._stage_texts]
        if missing:
            with torch.no_grad():
                features = torch.cat([self.text_features(missing[i : i + 256]) for i in range(0, len(missing), 256)])
            self._stage_texts.update(zip(missing, features, strict=True))
        return torch.stack([self._stage_texts[t] for t in texts])

    def training_loss(self, stage: str, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.stage(stage)
        device = self.backbone.device
        v, target = batch["ref"].embeds.to(device).float(), batch["target"].embeds.to(device).float()
        target = F.normalize(target, dim=-1)
        if stage == "finetune":
            # CLIP4Cir's element-wise sum of the raw features.
            q = F.normalize(v + self.text_features(batch["text"]), dim=-1)
        else:
            q = self.combine(v, self._frozen_text_features(batch["text"]))
        return {"loss": info_nce(q, target, self.config.temperature)}

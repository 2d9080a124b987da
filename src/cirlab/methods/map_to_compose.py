"""Map-to-Compose: a two-stage, "from mapping to composing" framework for zero-shot composed image retrieval
(arXiv 2504.17990; only its abstract and reviews were readable), implemented as ``METHODS.md`` section
"Map-to-Compose" reads it.

Known (abstract and reviews): stage 1 maps an image to a pseudo-word token with a *visual semantic injection* (VSI)
module and a *soft text alignment* objective, from image-caption pairs; stage 2 fine-tunes the text encoder with
lightweight *composing adapters* on a small amount of synthetic triplets, with hard-negative mining; the method is
meant to work with both high- and low-quality synthetic triplets.

Inferred here (every choice is a field of ``MapToComposeConfig``, defaults as in ``METHODS.md``):

- Stage 1 (``stage1``, image-caption pairs): ``s0 = phi(v)`` with SEARLE's phi; VSI is one cross-attention block
  (query ``s0``, keys/values the image token states projected to ``w_t``), ``s = s0 + gate * xattn(s0, P)``,
  gate initialised to 0. Loss: InfoNCE(``t_s``, ``v``) + ``lambda_soft`` * KL(``p_i`` || ``r_i``) with
  ``t_s = t("a photo of $")``, ``$ := s``; ``p_i = softmax_j(cos(v_i, t(c_j)) / tau_t)`` over the batch
  captions (soft targets from the frozen backbone, ``tau_t = 0.05``) and ``r_i = softmax_j(cos(t_s_i, t(c_j)) /
  tau)``. Our choices beyond METHODS.md: the InfoNCE is symmetric (as Pic2Word/SEARLE), ``tau`` is the backbone's
  CLIP temperature, ``lambda_soft = 1`` (METHODS.md gives no value), VSI uses 8 heads with pre-norms, phi's
  dropout is SEARLE's 0.5.
- Stage 2 (``stage2``, synthetic triplets): ``phi`` and VSI frozen (and run without dropout, as at inference), the
  image encoder frozen; LoRA (rank 8, zero-initialised B) on the text encoder's attention q/v projections is the
  only trained part (``alpha = 16`` is our choice: METHODS.md gives none). Query
  ``q = t("a photo of $ that {text}")`` with ``$ := s(ref)``; loss InfoNCE(``q``, ``v_target``) with in-batch
  negatives plus ``k_hard = 8`` mined hard negatives per query (the training loop supplies the target's nearest
  other images in the frozen image space).
- Inference: ``q`` as in stage 2. Because stage 2 changes nothing but the adapters, the stage-1 model is the final
  model with its adapters switched off (``without_adapters``, or ``use_adapters=False`` in the config).

The adapters live inside the method's own deep copy of the backbone (backbones are shared between methods);
checkpoints hold ``phi``, VSI and the adapter tensors only.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.methods.base import CIRMethod, Stage, register_method
from cirlab.modules.injection import VisualSemanticInjection
from cirlab.modules.lora import inject_lora, lora_disabled, lora_parameters
from cirlab.modules.losses import clip_temperature, info_nce
from cirlab.modules.mappers import SearlePhi
from cirlab.modules.pseudo_word import encode_with_pseudo, prompt_query, text_embeds
from cirlab.placeholder import DEFAULT_PROMPT
from cirlab.types import ImageFeatures

STAGE1 = "stage1"
STAGE2 = "stage2"


@dataclass
class MapToComposeConfig:
    """Attributes:
    phi_dropout: dropout of SEARLE's phi.
    use_vsi: visual semantic injection on (ablation switch: False gives ``s = s0``).
    vsi_heads: VSI attention heads (must divide the token width). vsi_dropout: VSI attention dropout.
    train_prompt: stage-1 prompt holding the pseudo-word. prompt: stage-2 and query prompt (``{text}`` = edit).
    lambda_soft: weight of the soft text alignment KL (0 disables it; ablation switch).
    soft_temperature: ``tau_t`` of the soft targets ``p_i``.
    temperature: ``tau`` of the InfoNCE losses and of ``r_i`` (<= 0: the backbone's CLIP temperature).
    symmetric: stage-1 InfoNCE in both directions (text->image and image->text).
    lora_rank / lora_alpha / lora_dropout: the adapters (update scaled by ``alpha / rank``).
    lora_targets: attention projections of the text encoder that get adapters.
    k_hard: mined hard negatives per stage-2 query (0: in-batch negatives only).
    use_adapters: compose queries with the adapters on; False evaluates the stage-1 model (an evaluation-time
        ablation switch: stage 2 trains nothing but the adapters).
    """

    phi_dropout: float = 0.5
    use_vsi: bool = True
    vsi_heads: int = 8
    vsi_dropout: float = 0.0
    train_prompt: str = "a photo of $"
    prompt: str = DEFAULT_PROMPT
    lambda_soft: float = 1.0
    soft_temperature: float = 0.05
    temperature: float = 0.0
    symmetric: bool = True
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    k_hard: int = 8
    use_adapters: bool = True


def _text_encoder(backbone: Any) -> nn.Module:
    """The transformer of the backbone's text tower, where the adapters go."""
    text_model = getattr(getattr(backbone, "model", None), "text_model", None)
    if text_model is None or not hasattr(text_model, "encoder"):
        raise TypeError(
            f"map-to-compose adapts a transformers CLIP text encoder (backbones hf-clip, tiny); "
            f"{type(backbone).__name__} has no model.text_model.encoder"
        )
    return text_model.encoder


@register_method("map-to-compose")
class MapToCompose(CIRMethod):
    """Two stages: image -> pseudo-word mapping with VSI and soft alignment, then composing adapters (LoRA)."""

    config_class = MapToComposeConfig
    stages = (Stage(STAGE1, "pairs"), Stage(STAGE2, "synthetic_triplets"))
    needs_image_tokens = True

    def __init__(self, backbone: Any, config: MapToComposeConfig | None = None) -> None:
        # A private copy: the adapters change the text encoder's modules, and the caller's backbone is shared.
        super().__init__(copy.deepcopy(backbone), config)
        c = self.config
        bb = self.backbone
        self.phi = SearlePhi(bb.embed_dim, bb.token_dim, dropout=c.phi_dropout)
        self.vsi = (
            VisualSemanticInjection(bb.token_dim, bb.vision_width, c.vsi_heads, c.vsi_dropout) if c.use_vsi else None
        )
        # Injected at construction (B = 0 leaves the encoder unchanged), so load_method rebuilds them before loading.
        inject_lora(_text_encoder(bb), c.lora_targets, c.lora_rank, c.lora_alpha, c.lora_dropout)
        self._mapping_frozen = False

    # -- the pseudo-word ------------------------------------------------------------------------------------------
    def _mapping(self) -> list[nn.Module]:
        return [self.phi] + ([self.vsi] if self.vsi is not None else [])

    def pseudo_tokens(self, images: ImageFeatures) -> torch.Tensor:
        """Pseudo-word tokens ``s`` (B, w_t) of images: ``phi(norm(v))``, enriched by VSI from the image tokens."""
        s0 = self.phi(F.normalize(images.embeds.float(), dim=-1))  # (B, w_t)
        return self.vsi(s0, images.tokens) if self.vsi is not None else s0

    # -- inference -----------------------------------------------------------------------------------------------
    def compose(self, reference: ImageFeatures, texts: list[str]) -> torch.Tensor:
        switch = contextlib.nullcontext() if self.config.use_adapters else lora_disabled(self.backbone)
        with switch:
            return prompt_query(self.backbone, self.config.prompt, texts, self.pseudo_tokens(reference))

    @contextlib.contextmanager
    def without_adapters(self) -> Iterator[None]:
        """Runs the method with its text-encoder adapters off: exactly the stage-1 model, since stage 2 trains
        nothing else."""
        with lora_disabled(self.backbone):
            yield

    # -- training ------------------------------------------------------------------------------------------------
    def trainable_parameters(self, stage: str) -> list[nn.Parameter]:
        self.stage(stage)
        if stage == STAGE1:
            return [p for m in self._mapping() for p in m.parameters()]
        return lora_parameters(_text_encoder(self.backbone))

    def hard_negatives(self, stage: str) -> int:
        self.stage(stage)
        return self.config.k_hard if stage == STAGE2 else 0

    def prepare_stage(self, stage: str) -> None:
        super().prepare_stage(stage)
        # Frozen in stage 2, the mapping runs as at inference (no dropout): the adapters learn to compose exactly
        # the pseudo-words that queries will carry.
        self._mapping_frozen = stage == STAGE2
        self.train(self.training)

    def train(self, mode: bool = True) -> MapToCompose:
        super().train(mode)
        if self._mapping_frozen:
            for module in self._mapping():
                module.eval()
        return self

    def training_loss(self, stage: str, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.stage(stage)
        return self._mapping_loss(batch) if stage == STAGE1 else self._composing_loss(batch)

    def _mapping_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Stage 1: InfoNCE(t_s, v) + lambda_soft * KL(p || r) over the batch's images and captions."""
        c = self.config
        images: ImageFeatures = batch["image"]
        v = F.normalize(images.embeds.float(), dim=-1)  # (B, d)
        s = self.pseudo_tokens(images)  # (B, w_t)
        t_s = encode_with_pseudo(self.backbone, [c.train_prompt] * len(v), s).embeds
        t_s = F.normalize(t_s.float(), dim=-1)  # (B, d)
        tau = clip_temperature(self.backbone, self.config.temperature)
        contrastive = info_nce(t_s, v, tau, symmetric=c.symmetric)
        out = {"contrastive": contrastive}
        loss = contrastive
        if c.lambda_soft > 0:
            with torch.no_grad():
                t_c = text_embeds(self.backbone, list(batch["caption"]))  # (B, d), frozen encoder
                p = F.softmax(v @ t_c.t() / c.soft_temperature, dim=1)  # (B, B): soft targets p_i
            log_r = F.log_softmax(t_s @ t_c.t() / tau, dim=1)  # (B, B): log r_i
            soft = F.kl_div(log_r, p, reduction="batchmean")
            out["soft"] = soft
            loss = loss + c.lambda_soft * soft
        return {"loss": loss, **out}

    def _composing_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Stage 2: InfoNCE(q, v_target) with in-batch and mined hard negatives; only the adapters get gradients."""
        with torch.no_grad():
            s = self.pseudo_tokens(batch["ref"])  # (B, w_t), the frozen mapping
        q = prompt_query(self.backbone, self.config.prompt, list(batch["text"]), s)  # (B, d)
        target = F.normalize(batch["target"].embeds.float(), dim=-1)  # (B, d)
        hard = batch.get("hard_negatives")
        negatives = None
        if hard is not None and self.config.k_hard > 0:
            negatives = F.normalize(hard.embeds.float(), dim=-1).reshape(len(q), -1, target.shape[1])  # (B, k, d)
        loss = info_nce(q, target, clip_temperature(self.backbone, self.config.temperature), extra_negatives=negatives)
        return {"loss": loss}

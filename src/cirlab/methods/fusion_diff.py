"""Fusion-Diff (arXiv 2512.01636, "Fusion-Diff": generative editing of fused multimodal features for zero-shot
composed image retrieval).

Known (paper abstract and a review): the method edits a *fused* multimodal feature in a joint vision-language space
(the final hidden state, L2-normalised, of a frozen multimodal LLM, Qwen2.5-VL-72B); stage 1 pre-trains a
diffusion prior over fused embeddings of generic image-text pairs (DDPM forward process); stage 2 fine-tunes a
lightweight Control-Adapter on about 200K synthetic triplets.

Our design (METHODS.md, "Fusion-Diff"); every inferred choice is a config field:

- Joint space: the backbone's, ``z(I) = v``, ``z(T) = t`` (``CLIPJointSpace``). With a CLIP backbone that is the
  CPU / Shapes space; with ``mllm:<hub id or dir>`` (``cirlab.backbones.mllm``, e.g. Qwen2.5-VL-72B, the paper's)
  it is the multimodal LLM's: ``v`` and ``t`` are the final states of the image and text prompts' last tokens.
  Image features come from the feature cache; text embeddings are cached in memory per distinct string (the text
  tower is frozen), so training never re-encodes.
- The fused feature ``z(I, T)`` (``fused``): ``sum`` (default) is ``norm(v + t)``, computable from cached features
  with any backbone; ``pair`` is the paper's, the multimodal LLM's embedding of the pair prompt (needs a backbone
  with ``encode_pair``: ``mllm``). A pair embedding depends on the image and the text together, so it cannot be
  formed from cached image features: stage ``prior`` declares ``pair_embeddings``, and its data source computes
  ``z(I, caption)`` once for every corpus (image, caption) pair through the feature cache and serves the pairs as
  its rows (``PairFeatures``; an epoch then visits every caption instead of drawing one per image). The inference
  path hands methods cached image features only, so ``pair`` refuses the fused query terms (``mix_weight`` > 0,
  ``init_strength`` < 1); the default sampler never uses them. ``sum`` stays a config choice beside ``pair`` so
  that the same method runs on CPU in the Shapes world and, in the multimodal-LLM space, without pair encoding (an
  ablation of the paper's fused feature).
- Stage ``prior`` (image-caption pairs): a transformer denoiser over ``[z_n, timestep, z(T)]`` predicts
  ``z_0 = z(I, T)`` (x0-prediction, MSE), cosine schedule with 1000 steps; the condition is replaced by a learned
  null token for ``cond_drop`` (10%) of the examples, for classifier-free guidance.
- Stage ``adapter`` (synthetic triplets): the prior is frozen; a Control-Adapter reading ``z(I_ref)``, ``z(text)``
  (and the timestep, ``adapter_timestep``) adds to every block's hidden states through zero-initialised linear
  layers, so training starts exactly at the stage-1 prior. Target ``z_0 = z(I_target)``, condition ``z(text)``.
- Inference: DDIM (``ddim_steps`` = 10, ``eta`` = 0) with guidance ``uncond + s (cond - uncond)``, where the
  conditional prediction is the adapted prior given ``z(text)`` and the unconditional one the frozen prior with its
  null condition and no adapter; ``q = norm(z_0)``, optionally mixed with ``z(I_ref, text)`` (``mix_weight``).
  Every query starts from the same seeded noise, so results do not depend on batching. Gallery: ``z(I)``.

Further inferred choices: embeddings enter the networks scaled by ``sqrt(d)`` (``embed_scale``; unit vectors
would otherwise drown in unit-variance noise, as in DALL-E 2's prior); DDIM timesteps use trailing spacing;
``init_strength`` < 1 would start sampling from the noised fused feature ``z(I_ref, text)`` (SDEdit) instead of
pure noise (off by default).

Ablation switches: ``use_adapter = false`` (the stage-1 prior alone: a new model has no adapter and skips the
``adapter`` stage; set on a trained model's config, sampling bypasses its adapter, which gives exactly its stage-1
prior since stage 2 trains nothing else),
``adapter_from_scratch = true`` ("the adapter trained without stage 1": the ``prior`` stage is skipped and the
randomly initialised prior is trained *jointly* with the adapter on the synthetic triplets, condition dropout
included, since a frozen random denoiser would not be a meaningful model), ``guidance_scale = 1`` (no guidance),
``ddim_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.methods.base import CIRMethod, Stage, register_method
from cirlab.modules.control_adapter import AdapterKind, ControlAdapter, steered_x0
from cirlab.modules.joint_space import CLIPJointSpace
from cirlab.modules.prior import PriorDenoiser
from cirlab.modules.prior_pipeline import FusionDiffPipeline
from cirlab.modules.schedule import NoiseSchedule
from cirlab.modules.widths import heads_width
from cirlab.types import ImageFeatures, PairEncoder, PairFeatures

FusedKind = Literal["sum", "pair"]
FUSED_KINDS = ("sum", "pair")


@dataclass
class FusionDiffConfig:
    """Settings of Fusion-Diff (sizes, ablation switches, sampling).

    Attributes:
        width: denoiser token width (0: ``2 d``, rounded up to a multiple of ``heads``).
        layers: denoiser blocks.
        heads: denoiser attention heads.
        dropout: dropout inside the denoiser and the adapter.
        num_timesteps: training timesteps of the cosine schedule.
        embed_scale: factor on unit embeddings entering the networks (<= 0: ``sqrt(d)``).
        cond_drop: share of examples trained with the null condition (for classifier-free guidance).
        use_adapter: train and use the Control-Adapter (false: the stage-1 prior alone).
        adapter_from_scratch: skip stage 1; train the prior jointly with the adapter on the synthetic triplets.
        adapter_kind: ``transformer`` (blocks over the control tokens) or ``mlp``.
        adapter_width: adapter width (0: ``d``, rounded up to a multiple of ``adapter_heads``).
        adapter_layers: adapter blocks (or hidden layers of the MLP).
        adapter_heads: adapter attention heads.
        adapter_timestep: the adapter also reads the diffusion timestep.
        ddim_steps: DDIM sampling steps.
        eta: DDIM stochasticity (0: deterministic).
        guidance_scale: classifier-free guidance scale (1: no guidance).
        samples: noise draws averaged per query.
        seed: sampling seed (and the seed of the eval-mode loss).
        mix_weight: weight of ``z(I_ref, text)`` mixed into the query (0: ``q = norm(z_0)``).
        init_strength: < 1 starts DDIM from the noised ``z(I_ref, text)`` and runs that fraction of the steps.
        text_cache: distinct texts whose embeddings are kept in memory.
        fused: the fused feature ``z(I, T)``: ``sum`` = ``norm(z(I) + z(T))``; ``pair`` = the backbone's pair
            embedding (``mllm`` backbones; stage-1 targets only, see the module docstring).
    """

    width: int = 0
    layers: int = 4
    heads: int = 8
    dropout: float = 0.0
    num_timesteps: int = 1000
    embed_scale: float = 0.0
    cond_drop: float = 0.1
    use_adapter: bool = True
    adapter_from_scratch: bool = False
    adapter_kind: AdapterKind = "transformer"
    adapter_width: int = 0
    adapter_layers: int = 2
    adapter_heads: int = 4
    adapter_timestep: bool = True
    ddim_steps: int = 10
    eta: float = 0.0
    guidance_scale: float = 2.0
    samples: int = 1
    seed: int = 0
    mix_weight: float = 0.0
    init_strength: float = 1.0
    text_cache: int = 100_000
    fused: FusedKind = "sum"


PRIOR_STAGE = Stage("prior", "pairs")
ADAPTER_STAGE = Stage("adapter", "synthetic_triplets")


@register_method("fusion-diff")
class FusionDiff(CIRMethod):
    """Fusion-Diff: a diffusion prior over fused joint-space features, steered by a Control-Adapter."""

    config_class = FusionDiffConfig
    # Every stage the method can have (the run config holds one loop config each); an instance runs the subset
    # its config enables (see __init__).
    stages = (PRIOR_STAGE, ADAPTER_STAGE)

    def __init__(self, backbone: Any, config: FusionDiffConfig | None = None) -> None:
        super().__init__(backbone, config)
        c = self.config
        if c.adapter_from_scratch and not c.use_adapter:
            raise ValueError("adapter_from_scratch needs use_adapter")
        if c.fused not in FUSED_KINDS:
            raise ValueError(f"fusion-diff fused must be one of {FUSED_KINDS}, got {c.fused!r}")
        if c.fused == "pair" and not isinstance(backbone, PairEncoder):
            raise ValueError(
                f"fusion-diff fused='pair' needs a backbone that embeds (image, text) pairs (mllm:<hub id or dir>);"
                f" {backbone.name} does not: use fused='sum'"
            )
        if c.fused == "pair" and (c.mix_weight > 0 or c.init_strength < 1.0):
            raise ValueError(
                "fusion-diff fused='pair' cannot use mix_weight > 0 or init_strength < 1: queries are composed from"
                " cached image features, from which the pair prompt's z(I_ref, text) cannot be formed"
            )
        d = backbone.embed_dim
        width = c.width or heads_width(2 * d, c.heads)
        self.joint = CLIPJointSpace(backbone, c.text_cache)
        self.schedule = NoiseSchedule(c.num_timesteps)
        self.embed_scale = c.embed_scale if c.embed_scale > 0 else math.sqrt(d)
        self.prior = PriorDenoiser(d, d, cond_tokens=1, width=width, layers=c.layers, heads=c.heads, dropout=c.dropout)
        self.adapter: ControlAdapter | None = None
        if c.use_adapter:
            self.adapter = ControlAdapter(
                d,
                2,
                width,
                c.layers,
                self.prior.num_tokens,
                kind=c.adapter_kind,
                width=c.adapter_width or heads_width(d, c.adapter_heads),
                layers=c.adapter_layers,
                heads=c.adapter_heads,
                use_timestep=c.adapter_timestep,
                dropout=c.dropout,
            )
        # The stages this configuration runs: no adapter stage without an adapter, no prior stage from scratch.
        self.stages = tuple(
            s
            for s in type(self).stages
            if not (s is PRIOR_STAGE and c.adapter_from_scratch) and not (s is ADAPTER_STAGE and not c.use_adapter)
        )

    # -- inference -------------------------------------------------------------------------------------------------
    def pipeline(self) -> FusionDiffPipeline:
        """The inference pipeline over this method's prior, schedule and adapter."""
        return FusionDiffPipeline(self.prior, self.schedule, self.adapter, self.embed_scale)

    def encode_gallery(self, images: ImageFeatures) -> torch.Tensor:
        return self.joint.embed(image=images)

    def compose(self, reference: ImageFeatures, texts: list[str]) -> torch.Tensor:
        c = self.config
        v = self.joint.embed(image=reference)  # (B, d)
        t = self.joint.embed(text=texts)  # (B, d)
        uses_fused = c.mix_weight > 0 or c.init_strength < 1.0
        fused = self.joint.embed(image=v, text=t) if uses_fused else None  # (B, d) = z(I_ref, text), sum form
        out = self.pipeline()(
            v if c.use_adapter else None,
            t,
            num_inference_steps=c.ddim_steps,
            guidance_scale=c.guidance_scale,
            eta=c.eta,
            seed=c.seed,
            num_samples=c.samples,
            init_z=fused if c.init_strength < 1.0 else None,
            strength=c.init_strength,
        )
        if c.mix_weight <= 0:
            return out.z0
        return F.normalize((1 - c.mix_weight) * out.z0 + c.mix_weight * fused, dim=-1)

    # -- training --------------------------------------------------------------------------------------------------
    def pair_embeddings(self, stage: str) -> bool:
        return stage == PRIOR_STAGE.name and self.config.fused == "pair"

    def trainable_parameters(self, stage: str) -> list[nn.Parameter]:
        self.stage(stage)
        if stage == PRIOR_STAGE.name:
            return list(self.prior.parameters())
        params = list(self.adapter.parameters())
        return params + list(self.prior.parameters()) if self.config.adapter_from_scratch else params

    def training_loss(self, stage: str, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """MSE of the x0 prediction at a random timestep.

        In training mode the timesteps, noise and condition dropout come from the global RNG (which the training
        loop seeds and checkpoints); in eval mode they come from a generator seeded with ``config.seed`` and
        nothing is dropped, so the loss is a fixed function of the weights (comparable between checkpoints).
        """
        self.stage(stage)
        s = self.embed_scale
        if stage == PRIOR_STAGE.name:
            text = self.joint.embed(text=batch["caption"], cached=True)  # (B, d) = z(T)
            z0 = self._fused_target(batch["image"], text)  # (B, d) = z(I, T)
            adapter, controls, prior_trains = None, None, True
        else:
            text = self.joint.embed(text=batch["text"], cached=True)  # (B, d)
            ref = self.joint.embed(image=batch["ref"])  # (B, d) = z(I_ref)
            z0 = self.joint.embed(image=batch["target"])  # (B, d) = z(I_target)
            adapter, controls = self.adapter, torch.stack([ref, text], dim=1) * s  # controls (B, 2, d)
            prior_trains = self.config.adapter_from_scratch
        x0 = z0 * s  # (B, d)
        b, device = x0.shape[0], x0.device
        generator = None if self.training else torch.Generator(device=device).manual_seed(self.config.seed)
        t = self.schedule.sample_timesteps(b, device, generator)  # (B,)
        noise = torch.randn(x0.shape, generator=generator, device=device)  # (B, d)
        x_t = self.schedule.q_sample(x0, t, noise)
        drop = None
        # Dropping the condition only teaches the unconditional branch, which is the prior's: with a frozen prior
        # (stage 2) it would only waste examples.
        if self.training and prior_trains and self.config.cond_drop > 0:
            drop = torch.rand(b, device=device) < self.config.cond_drop  # (B,)
        pred = steered_x0(self.prior, adapter, x_t, t, (text * s).unsqueeze(1), controls, drop)  # (B, d)
        loss = F.mse_loss(pred, x0)
        cos = F.cosine_similarity(pred.detach(), x0, dim=-1).mean()
        return {"loss": loss, "cos": cos}

    def _fused_target(self, image: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """Stage-1 target ``z(I, T)`` (B, d): the normalised sum, or the pair embedding the batch carries."""
        if self.config.fused == "sum":
            return self.joint.embed(image=image, text=text)
        if not isinstance(image, PairFeatures):
            raise ValueError(
                "fusion-diff fused='pair': stage 'prior' reads pair embeddings (PairFeatures rows, from"
                " cirlab.features.images.cached_pair_table), but this batch holds plain image features"
            )
        return F.normalize(image.fused.float(), dim=-1).to(text.device)

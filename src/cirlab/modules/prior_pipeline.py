"""Inference pipeline of a (Control-Adapter steered) diffusion prior: DDIM sampling with classifier-free guidance.

Inference only, one ``__call__`` returning a dataclass (the diffusers habit). The network (``PriorDenoiser`` and
optional ``ControlAdapter``) and the schedule (``NoiseSchedule`` + ``ddim_step``) are separate components.

Determinism: the starting noise (and, with ``eta > 0``, each step's noise) is drawn once per call from a
``torch.Generator`` seeded with ``seed`` as a single (d,) vector shared by every query of the batch, so a query's
result is the same whichever batch it is composed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cirlab.modules.control_adapter import ControlAdapter, steered_x0
from cirlab.modules.prior import PriorDenoiser
from cirlab.modules.schedule import NoiseSchedule, ddim_step, ddim_timesteps, guide


@dataclass
class FusionDiffOutput:
    """What the pipeline returns.

    Attributes:
        z0: the generated embeddings (B, d), L2-normalised (averaged over samples when several are drawn).
        trajectory: when asked for, the normalised x0 estimate after each sampling step (S, B, d), the last one
            equal to ``z0``; otherwise None.
    """

    z0: torch.Tensor
    trajectory: torch.Tensor | None = None


class FusionDiffPipeline:
    """Samples ``z_0`` given a modification text's and (through the adapter) a reference image's embeddings.

    The conditional prediction is the prior conditioned on the text embedding with the adapter's additions; the
    unconditional one is the prior with its learned null condition and no adapter (the stage-1 prior's own
    unconditional estimate), combined by classifier-free guidance.

    Args:
        prior: the denoiser (x0-prediction).
        schedule: the noise schedule it was trained with.
        adapter: an optional Control-Adapter reading ``[reference_z, text_z]``.
        embed_scale: factor applied to unit embeddings before they enter the networks (the outputs are
            L2-normalised, so it needs no undoing).
    """

    def __init__(
        self,
        prior: PriorDenoiser,
        schedule: NoiseSchedule,
        adapter: ControlAdapter | None = None,
        embed_scale: float = 1.0,
    ) -> None:
        self.prior = prior
        self.schedule = schedule
        self.adapter = adapter
        self.embed_scale = embed_scale

    def predict_x0(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text_z: torch.Tensor,
        reference_z: torch.Tensor | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The guided x0 prediction (B, d) in the scaled space at timesteps t (B,)."""
        # Scale 0 needs only the unconditional prediction and scale 1 only the conditional one.
        cond = self.conditional_x0(x_t, t, text_z, reference_z) if guidance_scale != 0.0 else None
        uncond = self.prior(x_t, t, None) if guidance_scale != 1.0 else None
        return guide(cond, uncond, guidance_scale)

    def conditional_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, text_z: torch.Tensor, reference_z: torch.Tensor | None
    ) -> torch.Tensor:
        """The prior's x0 prediction (B, d) conditioned on the text, steered by the adapter when there is one."""
        s = self.embed_scale
        controls = torch.stack([reference_z, text_z], dim=1) * s if reference_z is not None else None  # (B, 2, d)
        return steered_x0(self.prior, self.adapter, x_t, t, (text_z * s).unsqueeze(1), controls)

    @torch.no_grad()
    def __call__(
        self,
        reference_z: torch.Tensor | None,
        text_z: torch.Tensor,
        num_inference_steps: int = 10,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        seed: int = 0,
        num_samples: int = 1,
        init_z: torch.Tensor | None = None,
        strength: float = 1.0,
        return_trajectory: bool = False,
    ) -> FusionDiffOutput:
        """Runs DDIM from noise (or from a noised ``init_z``) to ``z_0``.

        Args:
            reference_z: reference-image embeddings (B, d), L2-normalised; None (or no adapter) samples from the
                text-conditioned prior alone.
            text_z: modification-text embeddings (B, d), L2-normalised (the prior's condition).
            num_inference_steps: DDIM steps.
            guidance_scale: classifier-free guidance scale (1: conditional only, 0: unconditional only).
            eta: DDIM stochasticity (0: deterministic).
            seed: seeds the noise; sample ``k`` of ``num_samples`` uses ``seed + k``.
            num_samples: samples averaged (after normalisation) into ``z0``.
            init_z: optional embeddings (B, d) to start from, noised to the first timestep (SDEdit); needs
                ``strength < 1`` to have any effect.
            strength: fraction of the DDIM trajectory to run when starting from ``init_z``.
            return_trajectory: also return the normalised x0 estimate after every step.
        """
        b, d = text_z.shape
        s = self.embed_scale
        steps = ddim_timesteps(
            self.schedule.num_timesteps, num_inference_steps, strength if init_z is not None else 1.0
        )
        total = torch.zeros(len(steps), b, d, device=text_z.device, dtype=text_z.dtype)  # running sum per step
        for k in range(num_samples):
            generator = torch.Generator().manual_seed(seed + k)
            noise = torch.randn(d, generator=generator).to(text_z)  # (d,), shared by the batch
            x = noise.expand(b, d)
            if init_z is not None and strength < 1.0:
                start = torch.full((b,), steps[0], dtype=torch.long, device=text_z.device)
                x = self.schedule.q_sample(init_z * s, start, x)
            for i, t in enumerate(steps):
                t_batch = torch.full((b,), t, dtype=torch.long, device=text_z.device)
                x0 = self.predict_x0(x, t_batch, text_z, reference_z, guidance_scale)  # (B, d)
                step_noise = torch.randn(d, generator=generator).to(text_z) if eta > 0 else None
                t_prev = steps[i + 1] if i + 1 < len(steps) else -1
                x = ddim_step(self.schedule, x, x0, t, t_prev, eta, step_noise)
                total[i] += F.normalize(x0, dim=-1)
        estimates = F.normalize(total, dim=-1)  # (S, B, d)
        return FusionDiffOutput(estimates[-1], estimates if return_trajectory else None)

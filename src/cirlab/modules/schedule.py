"""Noise schedule and samplers for diffusion over embedding vectors, independent of any denoiser.

Pure tensor code (the diffusers split: the schedule and the sampler know nothing of the network):

- ``cosine_betas``: the cosine schedule of Nichol & Dhariwal (2021), ``alpha_bar(t) = cos^2((t/T + s)/(1 + s) pi/2)``.
- ``NoiseSchedule``: the DDPM forward process ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``.
- ``ddim_timesteps`` / ``ddim_step``: DDIM (Song et al., 2021) in the x0-prediction parametrisation, any number of
  steps and any ``eta`` (0: deterministic); the step after the last timestep has ``alpha_bar = 1``, so the last
  step returns the network's x0 prediction itself.
- ``guide``: the classifier-free guidance combination ``uncond + scale (cond - uncond)``.
"""

from __future__ import annotations

import math

import torch


def cosine_betas(num_timesteps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Betas (T,) float64 of the cosine schedule, each clipped at ``max_beta`` (the last one would be 1)."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64)
    alpha_bar = torch.cos((steps / num_timesteps + offset) / (1 + offset) * math.pi / 2) ** 2  # (T + 1,)
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]  # (T,)
    return betas.clamp(max=max_beta)


class NoiseSchedule:
    """A discrete DDPM noise schedule and its forward process.

    Args:
        num_timesteps: number of training timesteps ``T`` (timesteps are ``0 .. T-1``).
        offset: the cosine schedule's small offset ``s``.
    """

    def __init__(self, num_timesteps: int = 1000, offset: float = 0.008) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
        self.num_timesteps = num_timesteps
        self.betas = cosine_betas(num_timesteps, offset)  # (T,) float64
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # (T,) float64, decreasing
        # Index -1 is "before any noise" (alpha_bar = 1): DDIM's last step moves there, where a sample is its x0.
        self._alpha_bar_padded = torch.cat([self.alphas_cumprod, torch.ones(1, dtype=torch.float64)])  # (T + 1,)

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``alpha_bar`` at integer timesteps ``t`` (B,) as (B, 1) in ``like``'s dtype and device (``t = -1``: 1)."""
        return self._alpha_bar_padded[t.cpu()].to(device=like.device, dtype=like.dtype).unsqueeze(-1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The forward process: ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise`` for x0 (B, D), t (B,)."""
        a = self.alpha_bar(t, x0)  # (B, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def sample_timesteps(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform training timesteps (n,) in ``0 .. T-1`` (the global RNG when ``generator`` is None)."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)


def ddim_timesteps(num_timesteps: int, num_steps: int, strength: float = 1.0) -> list[int]:
    """Descending DDIM timesteps with "trailing" spacing, so the first one is ``T - 1`` (pure noise).

    Args:
        num_timesteps: training timesteps ``T``.
        num_steps: sampling steps (at most ``T``).
        strength: fraction of the trajectory to run (< 1 starts from a partly noised input, as in SDEdit); the
            first ``round((1 - strength) * num_steps)`` timesteps are dropped.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    ratio = num_timesteps / num_steps
    steps = [round(num_timesteps - i * ratio) - 1 for i in range(num_steps)]
    return steps[round((1 - strength) * num_steps) :] or steps[-1:]


def ddim_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    x0_pred: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update ``x_t -> x_{t_prev}`` from the network's x0 prediction.

    ``eps`` is recovered from ``x_t`` and ``x0_pred``; ``x_{t_prev} = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps +
    sigma noise`` with ``sigma = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')``. When ``t_prev = -1`` the
    result is ``x0_pred`` exactly.

    Args:
        schedule: the noise schedule.
        x_t: current samples (B, D).
        x0_pred: predicted clean samples (B, D).
        t: current timestep.
        t_prev: next (smaller) timestep, -1 after the last one.
        eta: 0 for deterministic DDIM, 1 for DDPM-like ancestral noise.
        noise: standard normal (B, D) (or broadcastable) needed when ``eta > 0``.
    """
    if t_prev < 0:
        return x0_pred
    a = schedule.alpha_bar(torch.tensor([t]), x_t)  # (1, 1)
    a_prev = schedule.alpha_bar(torch.tensor([t_prev]), x_t)  # (1, 1)
    eps = (x_t - a.sqrt() * x0_pred) / (1 - a).sqrt()  # (B, D)
    sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()  # (1, 1)
    out = a_prev.sqrt() * x0_pred + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        out = out + sigma * noise
    return out


def guide(cond: torch.Tensor | None, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``uncond + scale (cond - uncond)``.

    Scale 1 returns ``cond`` itself and scale 0 ``uncond`` itself (bit-exact, and the other may then be None).
    """
    if scale == 0.0 and uncond is not None:
        return uncond
    if cond is None or (scale != 1.0 and uncond is None):
        missing = "conditional" if cond is None else "unconditional"
        raise ValueError(f"guidance scale {scale} needs the {missing} prediction")
    if scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)

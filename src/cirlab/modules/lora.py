"""Low-rank adapters (LoRA, Hu et al., ICLR 2022) for the linear projections of a frozen transformer.

``inject_lora(module, ("q_proj", "v_proj"), rank=8, alpha=16)`` replaces every ``nn.Linear`` child of ``module``
whose attribute name is listed with a ``LoRALinear``: ``y = W x + b + (alpha / rank) * B A x``, with ``A``
random and ``B`` zero-initialised, so the wrapped model computes exactly what it computed before until ``B`` is
trained. It works on transformers' ``CLIPAttention`` (``q_proj``/``v_proj`` are plain ``nn.Linear``) and on any
module built the same way.

Why a small module and not ``peft``: peft is not a dependency of cirlab (installing it adds ``peft``,
``accelerate`` and ``psutil``), and cirlab's core imports no optional package without an extra (STYLE.md rules 1
and 12). More importantly, peft wraps the original layer as ``<name>.base_layer``, which renames the frozen
weights in the state dict; here the wrapper adopts the original ``weight`` and ``bias`` parameters under their
original names, so a method's checkpoint (which keeps only backbone keys absent from the original backbone)
holds exactly the ``lora_A``/``lora_B`` tensors. We need LoRA on linear layers only, which is a few lines.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: ``y = W x + b + scaling * B (A dropout(x))``.

    The adapter weights are float32 whatever the base dtype (bf16 weights are poor optimizer state); inputs are
    cast to them and the update back to the output dtype.

    Args:
        base: the layer to adapt; its ``weight`` and ``bias`` parameters are shared, not copied.
        rank: rank ``r`` of the update.
        alpha: scaling numerator: the update is multiplied by ``alpha / rank``.
        dropout: dropout on the adapter's input (0 disables).
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        # The same Parameter objects under the same names: the state-dict keys of the frozen layer do not change.
        self.weight = base.weight
        self.bias = base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))  # (out, r)
        # A as nn.Linear initialises its weight (and as peft does); B = 0 makes the update vanish at init.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        out = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return out
        low = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return out + (self.scaling * F.linear(low, self.lora_B)).to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def inject_lora(
    module: nn.Module,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Replaces, in place, every ``nn.Linear`` child of ``module`` named in ``targets`` with a ``LoRALinear``.

    Args:
        module: the model part to adapt (e.g. a CLIP text encoder); it is modified, so pass a private copy.
        targets: attribute names of the linear layers to adapt.
        rank: adapter rank.
        alpha: adapter scaling numerator.
        dropout: adapter input dropout.

    Returns:
        The qualified names (relative to ``module``) of the adapted layers.

    Raises:
        ValueError: when no layer matches (a typo in ``targets`` must not silently train nothing), or when
            ``module`` already holds adapters.
    """
    if any(isinstance(m, LoRALinear) for m in module.modules()):
        raise ValueError("the module already holds LoRA adapters")
    wanted = set(targets)
    # Collect first: replacing children while iterating named_modules would visit the new modules.
    found = [
        (parent_name, parent, child_name, child)
        for parent_name, parent in module.named_modules()
        for child_name, child in parent.named_children()
        if child_name in wanted and isinstance(child, nn.Linear)
    ]
    if not found:
        raise ValueError(f"no nn.Linear named {sorted(wanted)} in {type(module).__name__}")
    names = []
    for parent_name, parent, child_name, child in found:
        setattr(parent, child_name, LoRALinear(child, rank, alpha, dropout))
        names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def lora_layers(module: nn.Module) -> list[LoRALinear]:
    """Every ``LoRALinear`` inside ``module``."""
    return [m for m in module.modules() if isinstance(m, LoRALinear)]


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (``lora_A``, ``lora_B``) of every ``LoRALinear`` inside ``module``."""
    return [p for layer in lora_layers(module) for p in (layer.lora_A, layer.lora_B)]


@contextlib.contextmanager
def lora_disabled(module: nn.Module) -> Iterator[None]:
    """Runs ``module`` as if it had no adapters (e.g. to evaluate the model a first training stage produced)."""
    layers = lora_layers(module)
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer, flag in zip(layers, previous, strict=True):
            layer.enabled = flag

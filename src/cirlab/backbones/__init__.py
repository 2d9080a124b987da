"""Vision-language backbones registered by name in ``BACKBONES``; specs look like ``name`` or ``name:weights``."""

from __future__ import annotations

from typing import Any

from cirlab.backbones import hf_clip, mllm, open_clip, shapes_clip, tiny  # noqa: F401  (registration)
from cirlab.registry import BACKBONES

__all__ = ["BACKBONES", "create_backbone", "parse_spec"]


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Splits ``"hf-clip:org/name"`` into ``("hf-clip", "org/name")``; a bare name has no weights."""
    name, sep, weights = spec.partition(":")
    return name, (weights if sep else None)


def create_backbone(spec: str, **kwargs: Any) -> Any:
    """Builds the backbone named by ``spec`` (``tiny``, ``shapes-clip``, ``hf-clip:<hub id or dir>``,
    ``open-clip:<arch>``, ``mllm:<hub id or dir>``)."""
    name, weights = parse_spec(spec)
    factory = BACKBONES.get(name)
    return factory(weights, **kwargs) if weights is not None else factory(**kwargs)

"""Vision-language backbones registered by name in ``BACKBONES``; specs look like ``name`` or ``name:weights``."""

from __future__ import annotations

from typing import Any

from cirlab.backbones import hf_clip, mllm, open_clip, tiny  # noqa: F401  (registration)
from cirlab.registry import BACKBONES

__all__ = ["BACKBONES", "create_backbone", "parse_spec"]


PREPROCESS_OPTIONS = ("targetpad",)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Splits ``"hf-clip:org/name"`` into ``("hf-clip", "org/name")``; a bare name has no weights; preprocessing
    options (``#...``) are dropped (see :func:`preprocess_options`)."""
    name, sep, weights = spec.partition("#")[0].partition(":")
    return name, (weights if sep else None)


def preprocess_options(spec: str) -> dict[str, float]:
    """The preprocessing options after ``#`` in a spec: ``targetpad=RATIO`` (``targetpad`` alone: 1.25, CLIP4Cir's
    and SEARLE's ratio), several joined by ``&``.

    Raises:
        ValueError: naming the spec and the option that is unknown or malformed.
    """
    _, sep, tail = spec.partition("#")
    options: dict[str, float] = {}
    for item in tail.split("&") if sep else []:
        key, has_value, value = item.partition("=")
        if key not in PREPROCESS_OPTIONS:
            raise ValueError(f"backbone spec {spec!r}: unknown option {key!r}; known: {', '.join(PREPROCESS_OPTIONS)}")
        try:
            options[key] = float(value) if has_value else 1.25
        except ValueError:
            raise ValueError(f"backbone spec {spec!r}: {key} needs a number, got {value!r}") from None
        if options[key] < 1:
            raise ValueError(f"backbone spec {spec!r}: {key} must be at least 1, got {options[key]}")
    return options


def create_backbone(spec: str, **kwargs: Any) -> Any:
    """Builds the backbone named by ``spec`` (``tiny``, ``hf-clip:<hub id or dir>``, ``open-clip:<arch>``,
    ``mllm:<hub id or dir>``), with the preprocessing options after ``#`` (``...#targetpad=1.25``) applied to its
    image transform; the backbone's ``name`` is the whole spec, so checkpoints rebuild the same preprocessing."""
    import dataclasses

    name, weights = parse_spec(spec)
    options = preprocess_options(spec)
    factory = BACKBONES.get(name)
    backbone = factory(weights, **kwargs) if weights is not None else factory(**kwargs)
    if options:
        backbone.image_transform = dataclasses.replace(backbone.image_transform, pad_ratio=options["targetpad"])
        backbone.name = spec
    return backbone

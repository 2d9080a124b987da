"""Vision-language backbones registered by name in ``BACKBONES``; specs look like ``name`` or ``name:weights``."""

from __future__ import annotations

from typing import Any

from cirlab.backbones import hf_clip, mllm, open_clip, shapes_clip, tiny  # noqa: F401  (registration)
from cirlab.registry import BACKBONES

__all__ = ["BACKBONES", "create_backbone", "parse_spec"]


# Options after ``#`` in a spec: ``targetpad`` changes the image preprocessing, ``gap`` the joint space (a CLIP's
# ``modality_gap``). Both are part of the spec, so a checkpoint's recorded backbone name rebuilds them.
SPEC_OPTIONS = ("targetpad", "gap")
GAP_BACKBONES = ("hf-clip", "shapes-clip", "tiny")  # the factories that pass ``modality_gap`` to ``HFCLIPBackbone``


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Splits ``"hf-clip:org/name"`` into ``("hf-clip", "org/name")``; a bare name has no weights; options
    (``#...``) are dropped (see :func:`spec_options`)."""
    name, sep, weights = spec.partition("#")[0].partition(":")
    return name, (weights if sep else None)


def spec_options(spec: str) -> dict[str, float]:
    """The options after ``#`` in a spec, several joined by ``&``: ``targetpad=RATIO`` (``targetpad`` alone: 1.25,
    CLIP4Cir's and SEARLE's ratio; at least 1) and ``gap=C`` (a modality gap of length C >= 0, see
    ``HFCLIPBackbone``).

    Raises:
        ValueError: naming the spec and the option that is unknown or malformed.
    """
    _, sep, tail = spec.partition("#")
    options: dict[str, float] = {}
    for item in tail.split("&") if sep else []:
        key, has_value, value = item.partition("=")
        if key not in SPEC_OPTIONS:
            raise ValueError(f"backbone spec {spec!r}: unknown option {key!r}; known: {', '.join(SPEC_OPTIONS)}")
        if key == "gap" and not has_value:
            raise ValueError(f"backbone spec {spec!r}: gap needs a length, e.g. gap=1.5")
        try:
            options[key] = float(value) if has_value else 1.25
        except ValueError:
            raise ValueError(f"backbone spec {spec!r}: {key} needs a number, got {value!r}") from None
    if options.get("targetpad", 1.0) < 1:
        raise ValueError(f"backbone spec {spec!r}: targetpad must be at least 1, got {options['targetpad']}")
    if not 0 <= options.get("gap", 0.0) < float("inf"):
        raise ValueError(f"backbone spec {spec!r}: gap must be a finite number >= 0, got {options['gap']}")
    return options


def create_backbone(spec: str, **kwargs: Any) -> Any:
    """Builds the backbone named by ``spec`` (``tiny``, ``shapes-clip``, ``hf-clip:<hub id or dir>``,
    ``open-clip:<arch>``, ``mllm:<hub id or dir>``), with the options after ``#`` applied: ``...#targetpad=1.25``
    to its image transform, ``...#gap=1.5`` as a CLIP's ``modality_gap``. The backbone's ``name`` is then the whole
    spec, so checkpoints rebuild the same preprocessing and joint space."""
    import dataclasses

    from cirlab.backbones.hf_clip import gap_spec

    name, weights = parse_spec(spec)
    options = spec_options(spec)
    if "gap" in options:
        if name not in GAP_BACKBONES:
            raise ValueError(f"backbone spec {spec!r}: gap applies to {', '.join(GAP_BACKBONES)} backbones only")
        if float(kwargs.get("modality_gap", options["gap"])) != options["gap"]:
            raise ValueError(f"backbone spec {spec!r}: its gap differs from modality_gap={kwargs['modality_gap']}")
        kwargs["modality_gap"] = options["gap"]
    factory = BACKBONES.get(name)
    backbone = factory(weights, **kwargs) if weights is not None else factory(**kwargs)
    if "targetpad" in options:
        backbone.image_transform = dataclasses.replace(backbone.image_transform, pad_ratio=options["targetpad"])
    if options:  # the spec names the options; a gap given as an argument is added to it
        backbone.name = spec if "gap" in options else gap_spec(spec, getattr(backbone, "modality_gap", 0.0))
    return backbone

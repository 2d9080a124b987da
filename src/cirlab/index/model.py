"""The model behind an index: a backbone spec plus a registered method name or a trained checkpoint directory.

The index stores this description (never the model itself), so loading an index rebuilds exactly the model that
embedded its gallery; ``key`` fingerprints everything the gallery embeddings depend on, so a rebuild reuses old
rows only when the model is unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cirlab.backbones import create_backbone, parse_spec
from cirlab.config import to_dict
from cirlab.features.hashing import hash_bytes, hash_file
from cirlab.io import read_json
from cirlab.methods.base import CONFIG_FILE, WEIGHTS_FILE, CIRMethod, create_method, load_method
from cirlab.registry import METHODS


def training_free_methods(costly: bool = False) -> list[str]:
    """Registered methods that compose queries without training and embed the gallery as the plain backbone does,
    so they can query any gallery the plain backbone embedded.

    Args:
        costly: include methods that run a captioner or a language model (CIReVL, LDRE, OSrCIR) or optimise for
            each query (SEARLE-OTI). An index offers those only when built with them: their models and their cost
            are configuration of the index, not something a query brings on.
    """
    return [
        name
        for name, cls in ((n, METHODS.get(n)) for n in METHODS.list())
        if not cls.stages
        and cls.encode_gallery is CIRMethod.encode_gallery
        and (costly or not (cls.generators or cls.optimises_per_query))
    ]


@dataclass
class ModelSpec:
    """What an index records about its model (``manifest["model"]``).

    Attributes:
        backbone: backbone spec, local paths made absolute (``hf-clip:/abs/dir``, ``tiny``).
        method: registered method name.
        checkpoint: absolute checkpoint directory, or None for a training-free method.
        method_config: the method's config as a dict.
        image_transform: the backbone's preprocessing settings.
        weights: digest of the checkpoint's weights file ("" without a checkpoint).
        key: fingerprint of everything the gallery embeddings depend on.
    """

    backbone: str
    method: str
    checkpoint: str | None
    method_config: dict[str, Any]
    image_transform: dict[str, Any]
    weights: str
    key: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def absolute_spec(spec: str) -> str:
    """``spec`` with a local weights path made absolute, so the index works from any directory; its options
    (``#targetpad=...``, ``#gap=...``) are kept."""
    name, weights = parse_spec(spec)
    _, sep, options = spec.partition("#")
    if weights and Path(weights).exists():
        return f"{name}:{Path(weights).resolve()}{sep}{options}"
    return spec


def is_checkpoint(method: str | Path) -> bool:
    """Whether ``method`` names a checkpoint directory (rather than a registered method)."""
    return (Path(method) / CONFIG_FILE).is_file()


def load_model(backbone: str | None, method: str, device: str | torch.device = "cpu") -> tuple[CIRMethod, ModelSpec]:
    """Builds the method an index composes queries with.

    Args:
        backbone: backbone spec; None with a checkpoint uses the checkpoint's own backbone.
        method: a training-free method name (``image-only``, ``text-only``, ``sum``, ``cirevl``, ...) or a
            checkpoint directory written by ``cirlab train``.
        device: where the model runs.

    Raises:
        ValueError: an unknown method, a method that needs training given by name, or no backbone.
    """
    if is_checkpoint(method):
        ckpt = Path(method).resolve()
        meta = read_json(ckpt / CONFIG_FILE)
        spec = absolute_spec(backbone or str(meta.get("backbone", "")))
        if not spec:
            raise ValueError(f"{ckpt / CONFIG_FILE}: names no backbone; pass one")
        model = load_method(ckpt, backbone=create_backbone(spec).freeze(), device=device)
        weights = hash_file(ckpt / WEIGHTS_FILE)
        checkpoint: str | None = str(ckpt)
    else:
        if method not in METHODS:
            raise ValueError(
                f"unknown method {method!r}: give a registered method ({', '.join(METHODS.list())}) "
                "or a checkpoint directory written by `cirlab train`"
            )
        if METHODS.get(method).stages:
            raise ValueError(
                f"method {method!r} needs training; pass its checkpoint directory (from `cirlab train {method}`) "
                f"or a training-free method ({', '.join(training_free_methods(costly=True))})"
            )
        if not backbone:
            raise ValueError("no backbone given; pass one such as hf-clip:<hub id or model dir>")
        spec = absolute_spec(backbone)
        model = create_method(method, create_backbone(spec).freeze()).to(device).eval()
        weights, checkpoint = "", None
    fingerprint = json.dumps(
        [model.backbone.identity(), model.name, to_dict(model.config), weights, model.image_encoder_frozen],
        sort_keys=True,
        default=str,
    )
    spec_out = ModelSpec(
        backbone=spec,
        method=model.name,
        checkpoint=checkpoint,
        method_config=to_dict(model.config),
        image_transform=model.backbone.image_transform.to_dict(),
        weights=weights,
        key=hash_bytes(fingerprint.encode()),
    )
    return model.eval(), spec_out


def shares_backbone_space(method: CIRMethod) -> bool:
    """Whether ``method``'s gallery embeddings are the plain backbone's, so training-free methods can query them."""
    return type(method).encode_gallery is CIRMethod.encode_gallery and method.image_encoder_frozen

"""The Shapes world's pretrained CLIP, shipped with cirlab (``shapes-clip``), as real CIR starts from a real CLIP.

The weights live in the package (``cirlab/assets/shapes-clip/``: a ``save_pretrained`` directory plus
``PRETRAINED.json`` with the file digests, the command that reproduces them, the pretraining config and the
metrics measured on the shipped files). ``shapes-clip`` loads them after checking the digests, so a damaged or
hand-edited install fails loudly instead of silently giving other numbers. ``cirlab shapes-pretrain`` retrains one.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

from cirlab.registry import BACKBONES

RECORD_FILE = "PRETRAINED.json"


def shipped_dir() -> Path:
    """The directory of the shipped Shapes CLIP inside the installed package."""
    return Path(str(resources.files("cirlab") / "assets" / "shapes-clip"))


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shipped_record(directory: Path | None = None) -> dict[str, Any]:
    """``PRETRAINED.json`` of the shipped CLIP (digests, command, config, metrics).

    Raises:
        FileNotFoundError: the package carries no Shapes CLIP (naming where it looked).
    """
    path = (directory or shipped_dir()) / RECORD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the shipped Shapes CLIP is missing; retrain it with `cirlab shapes-pretrain`")
    return json.loads(path.read_text(encoding="utf-8"))


def verify(directory: Path, record: dict[str, Any]) -> None:
    """Checks every file listed in ``record["files"]`` against its SHA-256.

    Raises:
        ValueError: a file is missing or differs, naming it.
    """
    for name, digest in record["files"].items():
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{path}: missing from the Shapes CLIP")
        if file_digest(path) != digest:
            raise ValueError(f"{path}: SHA-256 differs from {directory / RECORD_FILE}; the install is damaged")


@BACKBONES.register("shapes-clip")
def shapes_clip(weights: str | None = None, **kwargs: Any) -> Any:
    """The shipped Shapes CLIP (digests checked), or ``shapes-clip:<dir>`` for one written by ``shapes-pretrain``.

    It comes with the modality gap its record names (``PRETRAINED.json``'s ``modality_gap``: the gap that brings
    its logit scale to real CLIP's 100; ``HFCLIPBackbone``); ``modality_gap`` (or the spec option ``#gap=C``)
    overrides it, ``#gap=0`` for none. A directory without a record gets no gap.
    """
    from cirlab.backbones.hf_clip import HFCLIPBackbone, gap_spec

    directory = Path(weights) if weights else shipped_dir()
    record_path = directory / RECORD_FILE
    if record_path.is_file():
        record = shipped_record(directory)
        verify(directory, record)
        kwargs.setdefault("modality_gap", float(record.get("modality_gap", 0.0)))
    backbone = HFCLIPBackbone.from_pretrained(str(directory), **kwargs)
    backbone.name = gap_spec(f"shapes-clip:{weights}" if weights else "shapes-clip", backbone.modality_gap)
    return backbone

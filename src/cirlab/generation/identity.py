"""The identity of a generating model, computable without loading it: a weights digest or a pinned hub revision.

Generated texts are cached under it, so it must change whenever the model's answers may change, and it must be
computable from what a user who reproduces a result has: a local directory (its files are digested) or a hub id at
a commit (``org/name@<40 hex digits>`` needs nothing but the id; a branch name is resolved through the local hub
cache, or the hub when online).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

FULL_HASH_LIMIT = 8 << 20
"""Files up to this size are hashed whole; larger ones (weights) by size plus a strided sample of their bytes."""
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK = 64 << 10
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def split_revision(weights: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; an existing path or a name without ``@`` has no revision."""
    if "@" not in weights or Path(weights).exists():
        return weights, None
    name, _, revision = weights.rpartition("@")
    return name, revision or None


def file_digest(path: Path) -> str:
    """BLAKE2b of a file: the whole content up to ``FULL_HASH_LIMIT``, else the size and ``SAMPLE_BLOCKS`` evenly
    spaced blocks (a fine-tuned checkpoint differs in every block; hashing a 100 GB model whole would take minutes)."""
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    h.update(f"{size}:".encode())
    with open(path, "rb") as fh:
        if size <= FULL_HASH_LIMIT:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        else:
            stride = (size - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1)
            for i in range(SAMPLE_BLOCKS):
                fh.seek(i * stride)
                h.update(fh.read(SAMPLE_BLOCK))
    return h.hexdigest()


def directory_digest(path: str | Path) -> str:
    """Digest of every file under a model directory (names, sizes, contents as in ``file_digest``)."""
    root = Path(path)
    h = hashlib.blake2b(digest_size=16)
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)
    )
    if not files:
        raise FileNotFoundError(f"{root}: no model files")
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}={file_digest(p)};".encode())
    return h.hexdigest()


def resolve_commit(repo_id: str, revision: str | None) -> str:
    """The commit a hub id's revision points at: a full commit hash as is, else through the local hub cache, else
    the hub (when online).

    Raises:
        ValueError: the revision cannot be resolved (offline and not cached), with how to pin it.
    """
    if revision and COMMIT.match(revision):
        return revision
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision or "main")
    if isinstance(cached, str):
        return Path(cached).parent.name  # .../snapshots/<commit>/config.json
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ValueError(
            f"cannot resolve the revision of {repo_id!r} offline (not in the local hub cache); pin it with a commit "
            f"hash, e.g. {repo_id}@<40 hex digits>, or pass a local directory"
        )
    from huggingface_hub import HfApi

    try:
        return str(HfApi().model_info(repo_id, revision=revision).sha)
    except Exception as err:  # the hub client raises its own error types (network, missing repo, gated repo)
        raise ValueError(f"cannot resolve the revision of {repo_id!r}: {err}") from None


def weights_identity(weights: str) -> str:
    """``dir:<digest>`` for a local directory, ``hub:<id>@<commit>`` for a hub id (``org/name[@revision]``)."""
    name, revision = split_revision(weights)
    if Path(name).is_dir():
        return f"dir:{directory_digest(name)}"
    if Path(name).exists():
        raise ValueError(f"{name}: not a model directory")
    return f"hub:{name}@{resolve_commit(name, revision)}"

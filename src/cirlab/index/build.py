"""Building a gallery index from a folder of images, incrementally.

A rebuild hashes every file (unchanged files are answered from the feature cache's stat memo without reading
them), keeps the rows of files whose content the previous index already embedded with the same model, encodes
only new or changed files (through the feature cache, so content it has seen before is not encoded again), drops
rows of files that are gone, lists unreadable files and skips them, and commits the result atomically
(``cirlab.index.store``).

The encoding is committed to the feature cache as it goes (every ``FeatureCache.commit_seconds`` and whenever a
shard fills), so a build that is killed or interrupted resumes where it stopped: the next one finds those features
in the cache and encodes only the rest.

What is indexed: regular files with an image suffix, found by walking the folder without following links to
directories (no loops, nothing outside the folder by that road). A file that is a symbolic link is followed only
when its target lies inside the folder too; links leading out, named pipes, devices and sockets are listed as
skipped and never opened.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cirlab.data.images import IMAGE_SUFFIXES
from cirlab.features.cache import FeatureCache, default_cache_dir
from cirlab.index.ann import AnnConfig, build_ann, write_ann
from cirlab.index.encode import Progress, encode_gallery_files
from cirlab.index.model import load_model
from cirlab.index.store import IndexFormatError, claim_directory, read_generation, write_generation


@dataclass
class BuildReport:
    """What a build did.

    Attributes:
        count: images in the index.
        encoded: images that went through the image encoder.
        from_cache: images whose raw features the feature cache already held.
        reused: rows kept from the previous index (same content, same model).
        removed: rows of the previous index whose files are gone or changed.
        unreadable: relative path -> why it was skipped.
        seconds: wall time of the whole build.
        encode_seconds: wall time of the encoding step (decoding + model), for throughput.
        approximate: the approximate index's report (``AnnReport.to_dict()``), or None for exact search only.
    """

    count: int = 0
    encoded: int = 0
    from_cache: int = 0
    reused: int = 0
    removed: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    encode_seconds: float = 0.0
    approximate: dict[str, Any] | None = None

    @property
    def images_per_second(self) -> float:
        """Encoding throughput over the images that were encoded."""
        return self.encoded / self.encode_seconds if self.encode_seconds > 0 else 0.0


def find_images(root: Path, skip: Path | None = None) -> list[str]:
    """Image files under ``root`` (recursive, common formats, hidden entries skipped), as sorted relative paths.

    Links to directories are not descended into; a listed name may still be a link or a special file, which
    :func:`screen_file` tells apart.

    Args:
        root: the gallery folder.
        skip: a folder never descended into (the index directory, when it lies inside the gallery).
    """
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    skip = skip.resolve() if skip is not None else None
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() != skip)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append((here / name).relative_to(root).as_posix())
    return sorted(found)


def screen_file(root: Path, rel: str) -> str | None:
    """Why the listed file ``root / rel`` is not indexed without being opened, or None when it may be read.

    ``root`` is resolved, and the walk never enters a linked directory, so only the last component can be a link.
    """
    path = root / rel
    if not os.path.islink(path):
        return None
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(root):
        return f"{path}: a symbolic link to {target}, outside the indexed folder; not followed"
    return None


@dataclass
class _Previous:
    """What a rebuild takes from the previous index: its digests, its embeddings when the model is unchanged
    (else None), and the files it could not decode ((path, digest) -> reason), which are not tried again while
    both are unchanged."""

    digests: list[str] = field(default_factory=list)
    embeddings: np.ndarray | None = None
    undecodable: dict[tuple[str, str], str] = field(default_factory=dict)


def _previous(out: Path, model_key: str, log: Callable[[str], None]) -> _Previous:
    if not (out / "index.json").exists():
        return _Previous()
    try:
        old = read_generation(out)
    except IndexFormatError as err:
        log(f"ignoring the previous index ({err}); rebuilding from scratch")
        return _Previous()
    undecodable = {(u["path"], u["digest"]): u["error"] for u in old.manifest.get("unreadable", []) if u.get("digest")}
    if old.manifest["model"].get("key") != model_key:
        log("the model changed since the previous build; embedding every image again")
        return _Previous(old.digests, None, undecodable)
    return _Previous(old.digests, old.embeddings, undecodable)


def build_index(
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    backbone: str | None,
    method: str = "sum",
    approximate: AnnConfig | None = None,
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
    log: Callable[[str], None] = print,
) -> BuildReport:
    """Builds or updates the index of the images under ``images`` in the directory ``out``.

    Args:
        images: gallery folder (searched recursively).
        out: index directory: new, empty, or an existing index (updated incrementally); any other directory is
            refused, so no file of the user's is ever replaced or deleted.
        backbone: backbone spec (``hf-clip:<hub id or dir>``, ``tiny``); None with a checkpoint uses its own.
        method: training-free method name or checkpoint directory (see ``cirlab.index.model.load_model``).
        approximate: settings of an approximate index to build beside the embeddings; None for exact search only.
        cache: feature cache (default: ``cirlab.features.default_cache_dir()``).
        batch_size: images per forward pass.
        workers: decoding threads (0: one per core).
        device: where the model runs.
        progress: ``progress(done, total)`` over the images being encoded.
        log: one-line messages.

    Returns:
        What was built, encoded, reused, removed and skipped.

    Raises:
        ValueError: no readable image in the folder, or a bad model description.
        IndexFormatError: ``out`` is not empty and not an index.
    """
    t0 = time.perf_counter()
    root, out = Path(images).resolve(), Path(out).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    claim_directory(out)
    cache = cache if cache is not None else FeatureCache(default_cache_dir())
    model, spec = load_model(backbone, method, device)
    rel_paths = find_images(root, skip=out)
    if not rel_paths:
        raise ValueError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)")
    report = BuildReport()
    screened = {rel: why for rel in rel_paths if (why := screen_file(root, rel)) is not None}
    report.unreadable.update(screened)
    to_hash = [rel for rel in rel_paths if rel not in screened]
    hashed = cache.digests([root / p for p in to_hash])
    digest_by_rel = dict(zip(to_hash, hashed, strict=True))
    digests: list[str | OSError | None] = [digest_by_rel.get(rel) for rel in rel_paths]
    previous = _previous(out, spec.key, log)
    old_digests, old_embeddings = previous.digests, previous.embeddings
    old_rows = {d: i for i, d in enumerate(old_digests)} if old_embeddings is not None else {}
    readable = [i for i, d in enumerate(digests) if isinstance(d, str)]
    for i, d in enumerate(digests):
        if isinstance(d, OSError):
            report.unreadable[rel_paths[i]] = f"{type(d).__name__}: {d}"
    for i in readable:
        # The same file with the same bytes failed to decode last time: do not try again. Keyed by path too, so
        # another file with those bytes (two empty files, say) gets its own message naming it.
        reason = previous.undecodable.get((rel_paths[i], digests[i]))
        if reason is not None:
            report.unreadable[rel_paths[i]] = reason
    todo = [i for i in readable if digests[i] not in old_rows and rel_paths[i] not in report.unreadable]
    t_encode = time.perf_counter()
    encoded = encode_gallery_files(
        model,
        [root / rel_paths[i] for i in todo],
        [digests[i] for i in todo],
        cache,
        weights_id=spec.weights,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
    )
    report.encode_seconds = time.perf_counter() - t_encode
    for pos, why in encoded.failed.items():
        report.unreadable[rel_paths[todo[pos]]] = why
    new_rows = {todo[int(p)]: r for r, p in enumerate(encoded.positions)}
    keep = [i for i in readable if digests[i] in old_rows or i in new_rows]
    if not keep:
        raise ValueError(f"{root}: none of the {len(rel_paths)} image files could be read")
    dim = encoded.embeddings.shape[1] if len(encoded.positions) else old_embeddings.shape[1]
    embeddings = np.empty((len(keep), dim), dtype=np.float32)  # (N, d)
    for row, i in enumerate(keep):
        embeddings[row] = encoded.embeddings[new_rows[i]] if i in new_rows else old_embeddings[old_rows[digests[i]]]
    report.count = len(keep)
    report.encoded = encoded.n_encoded
    report.from_cache = len(new_rows) - encoded.n_encoded
    report.reused = len(keep) - len(new_rows)
    kept_digests = {digests[i] for i in keep}
    report.removed = sum(1 for d in old_digests if d not in kept_digests)
    ann_index = None
    if approximate is not None:
        ann_index, ann_report = build_ann(embeddings, approximate, log=None)
        report.approximate = ann_report.to_dict()
    report.seconds = time.perf_counter() - t0
    digest_of = {rel_paths[i]: digests[i] for i in readable}
    manifest = {
        "root": str(root),
        "model": spec.to_dict(),
        "approximate": report.approximate,
        "unreadable": [
            {"path": p, "error": e, "digest": digest_of.get(p)} for p, e in sorted(report.unreadable.items())
        ],
        "build": {
            "seconds": round(report.seconds, 3),
            "encoded": report.encoded,
            "from_cache": report.from_cache,
            "reused": report.reused,
            "removed": report.removed,
        },
    }
    write_generation(
        out,
        manifest,
        embeddings,
        [rel_paths[i] for i in keep],
        [digests[i] for i in keep],
        write_ann=(lambda path: write_ann(ann_index, path)) if ann_index is not None else None,
    )
    return report

"""Image folders as a corpus: images under a root (recursive), captions from sidecar ``.txt`` files or a manifest."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from cirlab.data.corpora.base import ImageCorpus, Sample, SkipCounter, Skipped
from cirlab.data.corpora.tables import CAPTION_KEYS, IMAGE_KEYS, as_captions, pick_field, read_records
from cirlab.data.images import IMAGE_SUFFIXES
from cirlab.registry import CORPORA

FOLDER_UNIT = 4096
"""Files per unit of an image folder: the granularity of the process/worker split and of the index cache."""


@CORPORA.register("imagefolder")
class ImageFolderCorpus(ImageCorpus):
    """Images under ``root`` (recursive), with optional captions.

    Captions come from a manifest (CSV/TSV/JSONL/parquet with an image column, e.g. ``image`` or ``path``, relative
    to ``root``, and a caption column, e.g. ``caption`` or ``text``; several rows per image give several captions)
    or, without one, from sidecar files: ``a/b.txt`` beside ``a/b.jpg``, one caption per line.

    Args:
        root: the image folder.
        manifest: optional manifest file; when given only the images it lists are in the corpus.
        image_key / caption_key: manifest column names (default: the first of the usual names present).
        limit: keep only the first ``limit`` images (0: all), e.g. for dry runs.
    """

    kind = "imagefolder"

    def __init__(
        self,
        root: str | Path,
        manifest: str | Path | None = None,
        image_key: str | None = None,
        caption_key: str | None = None,
        limit: int = 0,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: image folder not found")
        self.manifest = Path(manifest) if manifest else None
        self.skips = SkipCounter()
        self._captions: dict[str, list[str]] | None = None
        if self.manifest is not None:
            grouped: dict[str, list[str]] = {}
            for i, row in enumerate(read_records(self.manifest, self.skips)):
                image = pick_field(row, IMAGE_KEYS, image_key)
                if not isinstance(image, str) or not image:
                    self.skips.add("manifest row without image", f"{self.manifest} row {i}")
                    continue
                grouped.setdefault(image, []).extend(as_captions(pick_field(row, CAPTION_KEYS, caption_key)))
            self.files = list(grouped)
            self._captions = grouped
        else:
            self.files = sorted(
                p.relative_to(self.root).as_posix()
                for p in self.root.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
        if limit:
            self.files = self.files[:limit]

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        source = f"manifest {self.manifest}" if self.manifest else "sidecar .txt captions"
        return f"image folder {self.root} ({len(self)} images, {source})"

    def num_units(self) -> int:
        return (len(self.files) + FOLDER_UNIT - 1) // FOLDER_UNIT

    def _unit_files(self, unit: int) -> list[str]:
        return self.files[unit * FOLDER_UNIT : (unit + 1) * FOLDER_UNIT]

    def unit_signature(self, unit: int) -> str:
        h = hashlib.sha1(f"imagefolder\0{self.root.resolve()}".encode())
        if self.manifest is not None:
            st = self.manifest.stat()
            h.update(f"\0{self.manifest.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        for rel in self._unit_files(unit):
            for p in (self.root / rel, (self.root / rel).with_suffix(".txt")):
                try:
                    st = p.stat()
                    h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
                except OSError:
                    h.update(f"\0{rel}\0-".encode())
        return h.hexdigest()

    def captions_of(self, rel: str) -> list[str]:
        """Captions of one image (manifest rows or its sidecar file); unreadable sidecars count as none."""
        if self._captions is not None:
            return self._captions.get(rel, [])
        sidecar = (self.root / rel).with_suffix(".txt")
        if not sidecar.is_file():
            return []
        try:
            return [line.strip() for line in sidecar.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            self.skips.add("unreadable caption file", f"{sidecar}: {err}")
            return []

    def read_unit(self, unit: int) -> Iterator[Sample | Skipped]:
        for i, rel in enumerate(self._unit_files(unit)):
            path = self.root / rel
            if not path.is_file():
                yield Skipped("missing image file", str(path))
                continue
            yield Sample((unit, i), rel, self.captions_of(rel), path=path)

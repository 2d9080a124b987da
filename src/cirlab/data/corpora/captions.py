"""Caption files as a corpus, for language-only training: text, JSONL, CSV/TSV or parquet."""

from __future__ import annotations

from pathlib import Path

from cirlab.data.corpora.base import ShardContext, SkipCounter, shard_context
from cirlab.data.corpora.tables import CAPTION_KEYS, as_captions, pick_field, read_records
from cirlab.registry import CORPORA


@CORPORA.register("captions")
class CaptionCorpus:
    """Captions for language-only training: a text file (one caption per line), JSONL, CSV/TSV or parquet (a
    ``caption``/``text`` field, or ``caption_key``). Empty and malformed entries are skipped and counted.

    Args:
        path: the caption file.
        caption_key: field name in structured files (default: the first of the usual names present).
        limit: keep only the first ``limit`` captions (0: all).
    """

    kind = "captions"

    def __init__(self, path: str | Path, caption_key: str | None = None, limit: int = 0) -> None:
        self.path = Path(path)
        self.skips = SkipCounter()
        if self.path.suffix.lower() in (".txt", ".text"):
            if not self.path.is_file():
                raise FileNotFoundError(f"{self.path}: file not found")
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
            self.captions = [line.strip() for line in lines if line.strip()]
            blank = len(lines) - len(self.captions)
            if blank:
                self.skips.add("empty caption", str(self.path), blank)
        else:
            self.captions = []
            for i, row in enumerate(read_records(self.path, self.skips)):
                found = as_captions(pick_field(row, CAPTION_KEYS, caption_key))
                if not found:
                    self.skips.add("empty caption", f"{self.path} row {i}")
                self.captions.extend(found)
        if limit:
            self.captions = self.captions[:limit]
        if not self.captions:
            raise ValueError(f"{self.path}: no captions found")

    def __len__(self) -> int:
        return len(self.captions)

    def describe(self) -> str:
        return f"caption corpus {self.path} ({len(self)} captions)"

    def shard(self, ctx: ShardContext | None = None) -> list[str]:
        """This part's captions (every caption in exactly one part)."""
        ctx = ctx or shard_context()
        return self.captions[ctx.part :: ctx.parts]

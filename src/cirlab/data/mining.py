"""Caption-mined synthetic triplets (METHODS.md, "Synthetic triplets"): two images whose captions differ by one
edit become a (reference, modification text, target) triplet, the edit verbalised by a template.

Edits, on lower-cased word sequences: a *substitution* of one content word (``a red car`` / ``a blue car``),
typed ``colour``, ``count`` or ``object`` by small word lists, and an *insertion* of one content word (``a dog`` /
``a dog running``), typed ``add`` one way and ``remove`` the other. Stop words never make an edit. Every pair
gives a triplet in both directions.

Scale: pass 1 streams the captions once and writes, for each caption, the keys under which its partners must sit
(the word sequence with one position masked, for substitutions; with one word deleted, for insertions) into hash
partitions on disk; pass 2 reads one partition at a time, groups it by key and writes that partition's triplets.
Memory holds the captions and one partition, never all pairs. A key shared by very many captions (``a photo of
*``) would make quadratic pairs, so each key yields at most ``max_pairs_per_key``.

Deterministic (corpus order, sorted groups, templates chosen by a hash of the pair) and resumable: each finished
partition's triplets are a file of the work folder, written atomically, and a re-run skips them; the output JSONL
is assembled from them at the end, also atomically.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cirlab.io import atomic_path, atomic_write_json, read_json

Progress = Callable[[str, int, int | None], None]
"""``progress(phase, done, total)``; ``total`` is None while unknown."""

# fmt: off
STOP_WORDS = frozenset({
    "a", "an", "the", "of", "in", "on", "at", "to", "with", "and", "or", "for", "from", "by", "is", "are", "was",
    "were", "be", "been", "it", "its", "this", "that", "these", "those", "there", "some", "as", "into", "onto",
    "over", "under", "near", "next", "up", "down", "out", "off", "has", "have", "had", "his", "her", "their", "our",
    "your", "my", "we", "you", "they", "he", "she", "i", "me", "him", "them", "who", "which", "what", "while", "s",
})
COLOURS = frozenset({
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey", "gray",
    "silver", "gold", "golden", "beige", "teal", "navy", "violet", "maroon", "turquoise", "cyan", "magenta", "tan",
    "cream", "khaki", "olive",
})
COUNTS = frozenset({
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "single", "pair", "couple",
    "several", "many", "few",
})
# fmt: on
DEFAULT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("make it {new}", "change the {old} to {new}", "{new} instead of {old}"),
    "count": ("show {new} instead of {old}", "change the number from {old} to {new}"),
    "object": ("replace the {old} with a {new}", "change the {old} to a {new}", "{new} instead of {old}"),
    "add": ("add {word}", "also show {word}", "the same with {word}"),
    "remove": ("remove the {word}", "without the {word}", "take away the {word}"),
}
EDIT_TYPES = tuple(DEFAULT_TEMPLATES)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@dataclass
class MiningOptions:
    """Attributes:
    partitions: hash partitions of pass 1 (more: less memory per partition in pass 2).
    max_pairs_per_key: most pairs taken from one key group.
    min_words / max_words: captions outside this length (in words) are not used.
    templates: per edit type, the phrasings (``{old}``/``{new}`` or ``{word}``).
    edit_types: which edit types to keep.
    """

    partitions: int = 64
    max_pairs_per_key: int = 16
    min_words: int = 2
    max_words: int = 32
    templates: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_TEMPLATES.items()})
    edit_types: list[str] = field(default_factory=lambda: list(EDIT_TYPES))


def words(caption: str) -> list[str]:
    """The lower-cased words of a caption."""
    return _WORD.findall(caption.lower())


def edit_type(old: str, new: str) -> str:
    """``colour``, ``count`` or ``object`` for a substitution of ``old`` by ``new``."""
    if old in COLOURS and new in COLOURS:
        return "colour"
    if old in COUNTS and new in COUNTS:
        return "count"
    return "object"


def _stable(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


def verbalise(kind: str, templates: dict[str, list[str]], a: int, b: int, **slots: str) -> str:
    """The modification text of an edit: a template of its type picked by a hash of the pair (deterministic)."""
    options = templates[kind]
    return options[_stable(kind, a, b) % len(options)].format(**slots)


def _partition(key: str, n: int) -> int:
    return _stable(key) % n


def _keys(tokens: list[str]) -> Iterable[tuple[str, str, int]]:
    """(key, role, position) under which partners of this caption meet it."""
    n = len(tokens)
    # role "s": substitution partners share the sequence with position i masked.
    for i, w in enumerate(tokens):
        if w not in STOP_WORDS:
            yield " ".join([*tokens[:i], "*", *tokens[i + 1 :]]), "s", i
    # role "d": this caption minus one content word equals a shorter caption (role "f", the full sequence).
    for i, w in enumerate(tokens):
        if w not in STOP_WORDS:
            yield " ".join([*tokens[:i], *tokens[i + 1 :]]) + " #", "d", i
    if n:
        yield " ".join(tokens) + " #", "f", -1


@dataclass
class Caption:
    """A caption of the corpus and the image it describes."""

    image: str
    text: str


def _signature(captions: list[Caption], options: MiningOptions) -> str:
    h = hashlib.sha1(json.dumps(asdict(options), sort_keys=True).encode())
    for c in captions:
        h.update(f"\0{c.image}\0{c.text}".encode())
    return h.hexdigest()


def _pairs(group: list[tuple[int, str, int]], cap: int) -> Iterable[tuple[int, int, str, int, int]]:
    """Pairs (a, b, kind, pos_a, pos_b) of one key group, ``a`` before ``b`` in corpus order, at most ``cap``."""
    found = 0
    subs = sorted((cid, pos) for cid, role, pos in group if role == "s")
    for x in range(len(subs)):
        for y in range(x + 1, len(subs)):
            if found >= cap:
                return
            yield subs[x][0], subs[y][0], "s", subs[x][1], subs[y][1]
            found += 1
    longer = sorted({(cid, pos) for cid, role, pos in group if role == "d"})
    shorter = sorted({cid for cid, role, _ in group if role == "f"})
    seen: set[tuple[int, int]] = set()
    for cid_long, pos in longer:
        for cid_short in shorter:
            if found >= cap:
                return
            if (cid_long, cid_short) in seen:
                continue  # a repeated word deleted at two positions gives the same pair
            seen.add((cid_long, cid_short))
            yield cid_short, cid_long, "i", -1, pos
            found += 1


def _triplets_of_pair(
    captions: list[Caption], tokens: list[list[str]], pair: tuple[int, int, str, int, int], options: MiningOptions
) -> list[dict[str, Any]]:
    a, b, kind, pa, pb = pair
    ca, cb = captions[a], captions[b]
    if ca.image == cb.image or tokens[a] == tokens[b]:
        return []
    out = []

    def record(ref: int, tgt: int, etype: str, text: str, edit: dict[str, str]) -> None:
        if etype in options.edit_types:
            out.append({
                "reference": captions[ref].image, "text": text, "target": captions[tgt].image,
                "edit": {"type": etype, **edit},
                "reference_caption": captions[ref].text, "target_caption": captions[tgt].text,
            })  # fmt: skip

    if kind == "s":
        old, new = tokens[a][pa], tokens[b][pb]
        etype = edit_type(old, new)
        record(a, b, etype, verbalise(etype, options.templates, a, b, old=old, new=new), {"from": old, "to": new})
        record(b, a, etype, verbalise(etype, options.templates, b, a, old=new, new=old), {"from": new, "to": old})
    else:  # a is the shorter caption; b has one more word at position pb
        word = tokens[b][pb]
        record(a, b, "add", verbalise("add", options.templates, a, b, word=word), {"word": word})
        record(b, a, "remove", verbalise("remove", options.templates, b, a, word=word), {"word": word})
    return out


def mine_triplets(
    captions: list[Caption],
    out: str | Path,
    options: MiningOptions | None = None,
    work_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Mines caption-differs-by-one-edit triplets from ``captions`` into the JSONL ``out``.

    Args:
        captions: the corpus's captions with their images' names (several captions per image allowed).
        out: the triplet JSONL: ``reference``, ``text``, ``target`` (image names as given), ``edit`` (type and
            words) and both captions.
        options: mining settings.
        work_dir: partitions and per-partition results (default ``<out>.work``); kept for resuming until the
            output is complete, then removed.
        progress: called as ``progress(phase, done, total)``.

    Returns:
        The report (also written to ``<out>.report.json``): captions used, triplets, triplets per edit type.
    """
    options = options or MiningOptions()
    unknown = set(options.edit_types) - set(options.templates)
    if unknown:
        raise ValueError(f"edit types without templates: {sorted(unknown)}")
    out = Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    signature = _signature(captions, options)
    marker = work / "pass1.json"
    if marker.is_file() and read_json(marker).get("signature") != signature:
        shutil.rmtree(work)  # another corpus or other options: start over
    tokens = [words(c.text) for c in captions]
    usable = [options.min_words <= len(t) <= options.max_words for t in tokens]
    parts_dir, results_dir = work / "partitions", work / "results"
    if not marker.is_file():
        parts_dir.mkdir(parents=True, exist_ok=True)
        with _PartitionWriter(parts_dir, options.partitions) as writer:
            for cid, toks in enumerate(tokens):
                if usable[cid]:
                    for key, role, pos in _keys(toks):
                        writer.add(_partition(key, options.partitions), f"{key}\t{role}\t{cid}\t{pos}\n")
                if progress is not None and (cid % 10_000 == 0 or cid == len(tokens) - 1):
                    progress("indexing captions", cid + 1, len(tokens))
        atomic_write_json(marker, {"signature": signature, "captions": len(captions), "usable": sum(usable)})
    results_dir.mkdir(parents=True, exist_ok=True)
    for p in range(options.partitions):
        result = results_dir / f"{p:05d}.jsonl"
        if not result.is_file():
            groups: dict[str, list[tuple[int, str, int]]] = {}
            with open(parts_dir / f"{p:05d}.tsv", encoding="utf-8") as f:
                for line in f:
                    key, role, cid, pos = line.rstrip("\n").split("\t")
                    groups.setdefault(key, []).append((int(cid), role, int(pos)))
            lines = []
            for key in sorted(groups):
                for pair in _pairs(groups[key], options.max_pairs_per_key):
                    lines += [json.dumps(r) + "\n" for r in _triplets_of_pair(captions, tokens, pair, options)]
            with atomic_path(result) as tmp:
                tmp.write_text("".join(lines), encoding="utf-8")
        if progress is not None:
            progress("pairing", p + 1, options.partitions)
    counts: Counter[str] = Counter()
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as dst:
        for p in range(options.partitions):
            with open(results_dir / f"{p:05d}.jsonl", encoding="utf-8") as src:
                for line in src:
                    counts[json.loads(line)["edit"]["type"]] += 1
                    dst.write(line)
    report = {
        "captions": len(captions),
        "captions_used": sum(usable),
        "images": len({c.image for c in captions}),
        "triplets": sum(counts.values()),
        "by_edit_type": {t: counts.get(t, 0) for t in options.edit_types},
        "output": str(out),
    }
    atomic_write_json(out.with_name(out.name + ".report.json"), report)
    shutil.rmtree(work)
    return report


class _PartitionWriter:
    """Buffered appends to ``partitions`` files, written under temporary names and renamed when all are complete."""

    def __init__(self, directory: Path, partitions: int, buffer_lines: int = 4096) -> None:
        self.directory, self.partitions, self.buffer_lines = directory, partitions, buffer_lines
        self.buffers: list[list[str]] = [[] for _ in range(partitions)]

    def _tmp(self, p: int) -> Path:
        return self.directory / f".{p:05d}.tsv.tmp"

    def __enter__(self) -> _PartitionWriter:
        for p in range(self.partitions):
            self._tmp(p).write_text("", encoding="utf-8")
        return self

    def add(self, p: int, line: str) -> None:
        self.buffers[p].append(line)
        if len(self.buffers[p]) >= self.buffer_lines:
            self._flush(p)

    def _flush(self, p: int) -> None:
        with open(self._tmp(p), "a", encoding="utf-8") as f:
            f.writelines(self.buffers[p])
        self.buffers[p] = []

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            return
        for p in range(self.partitions):
            self._flush(p)
            self._tmp(p).replace(self.directory / f"{p:05d}.tsv")

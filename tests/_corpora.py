"""Small corpora in the public formats, written by the tests themselves (no download): random-noise PNGs, an image
folder with sidecar captions, webdataset tar shards, a caption file, a triplet JSONL, and tiny CIRR / FashionIQ
benchmarks; the training-data settings each method reads them with. Also the bodies of the processes of the
two-process tests (``torch.multiprocessing.spawn`` imports them from here).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 230, 30)}
SHAPES = ("car", "dog", "cat", "boat")


def caption_of(i: int) -> str:
    colour = list(COLOURS)[i % len(COLOURS)]
    return f"a {colour} {SHAPES[(i // len(COLOURS)) % len(SHAPES)]}"


def image_bytes(i: int, fmt: str = "PNG") -> bytes:
    colour = COLOURS[list(COLOURS)[i % len(COLOURS)]]
    im = Image.new("RGB", (40, 40), colour)
    im.paste((i * 37 % 255, i * 91 % 255, 128), (5 + i % 20, 5, 15 + i % 20, 20))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def noise_pngs(folder: Path, n: int) -> list[Path]:
    """``n`` 32 px PNGs of seeded random noise, ``folder/img000.png`` onward (the same bytes on every call)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        paths.append(folder / f"img{i:03d}.png")
        paths[-1].write_bytes(buf.getvalue())
    return paths


def write_image_folder(root: Path, n: int = 12, corrupt: int = 0) -> list[str]:
    """``n`` PNGs under two sub-folders with sidecar captions, plus ``corrupt`` files that are not images."""
    names = []
    for i in range(n):
        rel = f"{'ab'[i % 2]}/img{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(image_bytes(i))
        (root / rel).with_suffix(".txt").write_text(caption_of(i) + "\n" + caption_of(i).replace("a ", "one ") + "\n")
        names.append(rel)
    for j in range(corrupt):
        rel = f"bad/broken{j}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"this is not an image")
        names.append(rel)
    return sorted(names)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, shards: int = 3, per_shard: int = 5, no_image: int = 0) -> tuple[str, list[str]]:
    """Webdataset shards ``root/shard-{000..N}.tar`` (jpg + txt + json); returns the brace pattern and the keys."""
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                n = s * per_shard + i
                key = f"{n:06d}"
                _add(tar, f"{key}.jpg", image_bytes(n, "JPEG"))
                _add(tar, f"{key}.txt", caption_of(n).encode())
                _add(tar, f"{key}.json", json.dumps({"caption": caption_of(n + 1), "id": n}).encode())
                keys.append(key)
            for j in range(no_image if s == 0 else 0):
                _add(tar, f"orphan{j}.txt", b"a caption without an image")
    return str(root / f"shard-{{000..{shards - 1:03d}}}.tar"), keys


def write_captions(path: Path, n: int = 20) -> list[str]:
    captions = [caption_of(i) for i in range(n)]
    path.write_text("\n".join(captions[: n // 2]) + "\n\n" + "\n".join(captions[n // 2 :]) + "\n")
    return captions


def write_triplets(path: Path, images: list[str], pseudo: bool = True) -> None:
    """Triplets over ``images`` (paths relative to the JSONL's folder, or corpus names), with a pseudo-target."""
    rng = random.Random(0)
    lines = []
    for i in range(len(images)):
        ref, tgt, alt = images[i], images[(i + 1) % len(images)], images[(i + 2) % len(images)]
        record = {"reference": ref, "text": rng.choice(["make it red", "add a dog", "remove the car"]), "target": tgt}
        if pseudo:
            record["pseudo_target"] = alt
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n{not json\n")


def write_cirr(root: Path, n: int = 12) -> tuple[Path, Path]:
    """A tiny CIRR (rc2 layout): train and val splits of ``n`` images each; returns (annotations, images)."""
    ann, images = root / "cirr", root / "images"
    for split, prefix in (("train", "train"), ("val", "dev")):
        names = [f"{prefix}-{i}-0-img0" for i in range(n)]
        files = {}
        for i, name in enumerate(names):
            rel = f"./{prefix}/{name}.png"
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            (images / rel).write_bytes(image_bytes(i + (0 if split == "train" else 50)))
            files[name] = rel
        pairs = []
        for i in range(n):
            members = [names[(i + k) % n] for k in range(6)]
            pairs.append({
                "pairid": (1000 if split == "train" else 2000) + i, "reference": names[i],
                "target_hard": names[(i + 1) % n], "target_soft": {names[(i + 1) % n]: 1.0},
                "caption": caption_of(i + 1).replace("a ", "show a ", 1),
                "img_set": {"id": i, "members": members, "reference_rank": 0, "target_rank": 1},
            })  # fmt: skip
        (ann / "captions").mkdir(parents=True, exist_ok=True)
        (ann / "image_splits").mkdir(parents=True, exist_ok=True)
        (ann / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(pairs))
        (ann / "image_splits" / f"split.rc2.{split}.json").write_text(json.dumps(files))
    return ann, images


def write_fashioniq(root: Path, n: int = 8) -> tuple[Path, Path]:
    """A tiny FashionIQ: train and val of every category, ``n`` images each; returns (annotations, images)."""
    ann, images = root / "fashioniq", root / "fashioniq-images"
    images.mkdir(parents=True, exist_ok=True)
    (ann / "captions").mkdir(parents=True, exist_ok=True)
    (ann / "image_splits").mkdir(parents=True, exist_ok=True)
    for c, category in enumerate(("dress", "shirt", "toptee")):
        for s, split in enumerate(("train", "val")):
            asins = [f"B{c}{s}{i:07d}" for i in range(n)]
            for i, asin in enumerate(asins):
                (images / f"{asin}.png").write_bytes(image_bytes(i + 10 * c + 100 * s))
            entries = [
                {"candidate": asins[i], "target": asins[(i + 1) % n], "captions": ["is darker", "has no sleeves"]}
                for i in range(n)
            ]
            (ann / "captions" / f"cap.{category}.{split}.json").write_text(json.dumps(entries))
            (ann / "image_splits" / f"split.{category}.{split}.json").write_text(json.dumps(asins))
    return ann, images


def write_corpora(root: Path) -> dict[str, str]:
    """Every corpus kind under ``root``: an image folder, webdataset shards, a caption file, triplet JSONLs naming
    folder images and shard keys, and a tiny CIRR; returns their paths by role."""
    names = write_image_folder(root / "imgs", n=12)
    pattern, keys = write_shards(root / "wds", 3, 4)
    write_captions(root / "captions.txt", 16)
    write_triplets(root / "imgs" / "triplets.jsonl", names)
    write_triplets(root / "wds-triplets.jsonl", keys)
    ann, images = write_cirr(root, 12)
    return {
        "root": str(root),
        "folder": str(root / "imgs"),
        "shards": pattern,
        "captions": str(root / "captions.txt"),
        "triplets": str(root / "imgs" / "triplets.jsonl"),
        "wds_triplets": str(root / "wds-triplets.jsonl"),
        "annotations": str(ann),
        "images": str(images),
    }


def data_overrides(method: str, corpora: dict[str, str], cache_dir: Path) -> list[str]:
    """The ``data.*`` settings that train ``method`` from :func:`write_corpora`'s corpora: language-only LinCIR from
    the caption file, the supervised methods from the CIRR triplets (TMCIR's stage A from the triplet JSONL's
    pseudo-targets), the others from the shards and the triplets naming shard keys."""
    base = [f"data.cache_dir={cache_dir}", "data.num_workers=1"]
    if method in ("tmcir", "combiner"):
        return [*base, "data.benchmark=cirr", f"data.annotations={corpora['annotations']}",
                f"data.benchmark_images={corpora['images']}", "data.val=cirr/val",
                f"data.triplets={corpora['triplets']}"]  # fmt: skip
    if method == "lincir":
        return [*base, f"data.captions={corpora['captions']}"]
    return [*base, f"data.images={corpora['shards']}", f"data.triplets={corpora['wds_triplets']}",
            "data.triplets_by_name=true"]  # fmt: skip


def few_steps_config(method: str, overrides: list[str]) -> Any:
    """``method``'s run config for a few steps: every stage 2 steps at batch 4 without a progress bar, and the
    method's own compute budgets (SEARLE's OTI steps and images) capped as a dry run caps them."""
    import dataclasses

    from cirlab.config import shrink_budgets
    from cirlab.methods import METHODS
    from cirlab.training.run_config import load_run_config

    steps = [f"{s.name}.{k}" for s in METHODS.get(method).stages for k in ("steps=2", "batch_size=4", "progress=false")]
    run_cfg = load_run_config(method, None, [*steps, *overrides])
    return dataclasses.replace(run_cfg, method=shrink_budgets(run_cfg.method, steps=2, items=16))


def join_gloo(rank: int, world_size: int, init_file: str) -> None:
    """Joins a ``spawn``-started process to a gloo group of ``world_size`` through ``init_file``, one torch thread;
    DataLoader workers then fork, as they do under torchrun (and start in ms). Leave through
    ``cirlab.distributed.process_group()``, which picks this group up."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)


def every_method_worker(rank: int, world_size: int, init_file: str, corpora_json: str, out: str) -> None:
    """One of two gloo processes: trains every method with stages for 2 steps of global batch 4 from the corpora
    (``fit``, this process's half of each batch); writes to ``out/rank<r>.json`` each method's report and, per
    stage, a digest of the weights this process ended the stage with (before ``fit`` loads the best checkpoint,
    which rank 0 wrote, back into every process): equal on both processes only if the gradients were averaged."""
    import hashlib

    import torch

    import cirlab
    import cirlab.training.run as run_module
    from cirlab.distributed import process_group
    from cirlab.features.cache import FeatureCache
    from cirlab.methods import METHODS, create_method
    from cirlab.training.corpus_source import CorpusSource
    from cirlab.training.run import fit

    ended: dict[str, str] = {}
    load_weights = run_module.load_weights

    def record_then_load(method, path):  # the loop's last-step weights, before the best ones replace them
        digest = hashlib.sha1()
        for name, tensor in sorted(method.state_dict().items()):
            digest.update(name.encode() + tensor.detach().float().contiguous().numpy().tobytes())
        ended[Path(path).parent.name] = digest.hexdigest()
        return load_weights(method, path)

    run_module.load_weights = record_then_load
    join_gloo(rank, world_size, init_file)
    with process_group():
        corpora = json.loads(Path(corpora_json).read_text())
        backbone = cirlab.create_backbone("tiny").freeze()
        results = {}
        for method in sorted(m for m in METHODS.list() if METHODS.get(m).stages):
            run_cfg = few_steps_config(method, data_overrides(method, corpora, Path(out) / "cache"))
            source = CorpusSource(run_cfg.data, FeatureCache(run_cfg.data.cache_dir))
            torch.manual_seed(0)
            model = create_method(method, backbone, run_cfg.method)
            ended.clear()
            report = fit(model, source, run_cfg, Path(out) / method, val_split=run_cfg.data.val or None, progress=False)
            results[method] = {"report": report, "stage_weights": dict(ended)}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))


def two_process_worker(rank: int, world_size: int, init_file: str, pattern: str, cache: str, out: str) -> None:
    """One of two gloo processes: the index pass (2 DataLoader workers), the encoding pass, then Pic2Word's stage
    trained a few steps through ``fit``; writes what this process read and got to ``out/rank<r>.json``."""
    import torch

    import cirlab
    from cirlab.distributed import process_group
    from cirlab.features.cache import FeatureCache
    from cirlab.features.corpus import index_corpus
    from cirlab.methods import create_method
    from cirlab.training.corpus_source import CorpusSource
    from cirlab.training.run import fit
    from cirlab.training.run_config import DataOptions, load_run_config

    join_gloo(rank, world_size, init_file)
    with process_group():
        from cirlab.data.corpora import WebDatasetCorpus

        local, _ = index_corpus(WebDatasetCorpus(pattern), num_workers=2)
        options = DataOptions(images=pattern, num_workers=2, cache_dir=cache)
        source = CorpusSource(options, FeatureCache(cache))
        backbone = cirlab.create_backbone("tiny").freeze()
        run_cfg = load_run_config(
            "pic2word", None, ["mapping.steps=2", "mapping.batch_size=4", "mapping.progress=false"]
        )
        torch.manual_seed(0)
        method = create_method("pic2word", backbone, run_cfg.method)
        report = fit(method, source, run_cfg, Path(out) / "checkpoint", val_split=None, progress=False)
        table = source.encoded_corpus(backbone, False).table
        result = {
            "local": [e.name for e in local],
            "table": table.names,
            "embeds_sum": float(table.embeds.sum()),
            "report": report,
        }
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))

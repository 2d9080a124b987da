"""Search commands: ``index build`` (embed a folder of images), ``search`` (one query), ``serve`` (web page + API)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cirlab.experiments import SHAPES_ROOT

_GENERATIONS_HELP = (
    "Generated-text cache (JSONL) of methods that run a captioner or a language model (cirevl, ldre, osrcir); "
    "default: the user cache, ~/.cache/cirlab/generations.jsonl."
)

index_app = typer.Typer(
    name="index",
    help="Gallery indexes: embed a folder of images once, search it many times.",
    no_args_is_help=True,
)


def default_backbone(root: Path = SHAPES_ROOT) -> str:
    """The Shapes CLIP that ships with cirlab (the one the demo uses), else the newest one built under ``root``,
    else a clear error."""
    from cirlab.backbones.shapes_clip import shipped_dir

    if (shipped_dir() / "config.json").is_file():
        return "shapes-clip"
    built = sorted(root.glob("clip-*/best/config.json"), key=lambda p: p.stat().st_mtime)
    if built:
        return f"hf-clip:{built[-1].parent}"
    raise typer.BadParameter(
        f"no backbone given, no shipped Shapes CLIP and none under {root}/ (build one with `cirlab demo --quick`); "
        "pass --backbone hf-clip:<hub id or model dir>, e.g. hf-clip:openai/clip-vit-base-patch32",
        param_hint="--backbone",
    )


def printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (``\\n``, ``\\x1b``), so a file name cannot
    start a line of its own, forge lines of a report or send terminal escape sequences."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _progress(console):
    from rich.progress import TaskProgressColumn, TextColumn, TimeElapsedColumn

    from cirlab.progress import progress_bar

    class ThroughputColumn(TextColumn):
        """Images per second over the encoding so far."""

        def render(self, task):  # type: ignore[override]
            from rich.text import Text

            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} img/s" if speed else "- img/s", style="cyan")

    return progress_bar(TaskProgressColumn(), ThroughputColumn(""), TimeElapsedColumn(), console=console)


@index_app.command("build")
def build_cmd(
    images: Annotated[Path, typer.Argument(help="Folder of images (searched recursively: jpg, png, webp, ...).")],
    out: Annotated[Path, typer.Option("--out", help="Index directory (an existing index is updated).")],
    backbone: Annotated[
        str | None,
        typer.Option(
            "--backbone", help="Backbone spec, e.g. hf-clip:openai/clip-vit-base-patch32 (default: the Shapes CLIP)."
        ),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="A training-free method (image-only, text-only, sum, cirevl, ldre, osrcir) or a checkpoint directory "
            "(`cirlab train cirevl --dataset shapes` saves one set up with the Shapes stand-ins).",
        ),
    ] = "sum",
    approximate: Annotated[
        str | None, typer.Option("--approximate", help="Also build an approximate index: hnsw or ivf.")
    ] = None,
    target_recall: Annotated[
        float, typer.Option("--target-recall", help="Recall@50 vs exact the approximate index is tuned to.")
    ] = 0.95,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
    workers: Annotated[int, typer.Option("--workers", help="Image decoding threads (0: one per core).")] = 0,
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Feature cache directory (default: ~/.cache/cirlab/features).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")] = "cpu",
) -> None:
    """Embed every image under IMAGES into an index; re-running encodes only new or changed files.

    Unreadable files are listed at the end and skipped. Search is exact by default; --approximate adds an HNSW
    or IVF structure whose recall@50 against exact search is measured and printed.

    Example: `cirlab index build photos/ --out runs/photos-index --backbone hf-clip:openai/clip-vit-base-patch32`
    """
    from rich.console import Console

    from cirlab.features.cache import FeatureCache, default_cache_dir
    from cirlab.index import APPROXIMATE_KINDS, AnnConfig, build_index
    from cirlab.index.model import is_checkpoint

    if approximate is not None and approximate not in APPROXIMATE_KINDS:
        raise typer.BadParameter(f"choose one of {', '.join(APPROXIMATE_KINDS)}", param_hint="--approximate")
    if backbone is None and not is_checkpoint(method):
        backbone = default_backbone()
        typer.echo(f"backbone: {backbone} (the Shapes CLIP; pass --backbone to choose another)")
    console = Console(stderr=True)
    bar = _progress(console)
    task = bar.add_task("encoding", total=None)
    with bar:
        report = build_index(
            images,
            out,
            backbone=backbone,
            method=method,
            approximate=AnnConfig(kind=approximate, target_recall=target_recall) if approximate else None,
            cache=FeatureCache(cache or default_cache_dir()),
            batch_size=batch_size,
            workers=workers,
            device=device,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            log=console.print,
        )
    typer.echo(
        f"indexed {report.count} images into {out} in {report.seconds:.1f} s: encoded {report.encoded}"
        + (f" ({report.images_per_second:.1f} images/s)" if report.encoded else "")
        + f", {report.from_cache} from the feature cache, {report.reused} kept from the previous index,"
        f" {report.removed} removed"
    )
    if report.approximate:
        ann = report.approximate
        params = ", ".join(f"{k}={v}" for k, v in ann["params"].items())
        typer.echo(
            f"approximate index: {ann['kind']} ({params}); recall@{ann['k']} vs exact search "
            f"{ann['recall']:.3f} on {ann['queries']} sample queries (target {ann['target']})"
        )
    if report.unreadable:
        typer.echo(f"skipped {len(report.unreadable)} unreadable file(s):")
        for path, why in sorted(report.unreadable.items()):
            typer.echo(f"  {printable(path)}: {printable(why)}")


def search_cmd(
    index_dir: Annotated[Path, typer.Argument(help="Index directory written by `cirlab index build`.")],
    image: Annotated[
        str, typer.Option("--image", help="Reference image: a file, or a gallery image's path as indexed.")
    ],
    text: Annotated[str, typer.Option("--text", help="Modification text, e.g. 'the same but red'.")],
    k: Annotated[int, typer.Option("-k", "--top", help="How many results.", min=1)] = 10,
    method: Annotated[
        str | None, typer.Option("--method", help="Query with another method (default: the index's own).")
    ] = None,
    exact: Annotated[bool, typer.Option("--exact", help="Exhaustive search even with an approximate index.")] = False,
    include_reference: Annotated[
        bool, typer.Option("--include-reference", help="Keep the reference image itself in the results.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    generations: Annotated[Path | None, typer.Option("--generations", help=_GENERATIONS_HELP)] = None,
) -> None:
    """Search an index with a reference image and a modification text; prints ranked paths with scores.

    Example: `cirlab search runs/photos-index --image photos/dress.jpg --text "the same dress but red" -k 5`
    """
    from cirlab.generation import TextCache, default_generation_cache
    from cirlab.index import load_index

    index = load_index(index_dir, text_cache=TextCache(generations or default_generation_cache()))
    query = index.compose(image, text, method)
    hits = index.search(query, k, exact=exact, exclude_reference=not include_reference)
    if as_json:
        payload = {
            "index": str(index_dir),
            "method": query.method,
            "text": text,
            "results": [{"rank": h.rank, "score": h.score, "path": h.path, "file": str(h.file)} for h in hits],
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{query.method}: {image} + {text!r}", caption=f"paths under {index.root}")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("path", overflow="fold")
    for hit in hits:
        table.add_row(str(hit.rank), f"{hit.score:.4f}", hit.path)
    Console().print(table)


def serve_cmd(
    index_dir: Annotated[Path, typer.Argument(help="Index directory written by `cirlab index build`.")],
    host: Annotated[str, typer.Option("--host", help="Interface to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.", min=1, max=65535)] = 8000,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="A host name or address clients use to reach the server (repeatable; '*.lan' for a domain, '*' "
            "for any). Loopback names are always allowed; --host's own address is added.",
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help="Require the token in this file's first line on every request (or set CIRLAB_SERVE_TOKEN).",
        ),
    ] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest accepted upload.", min=0.01)] = 10.0,
    threads: Annotated[
        int,
        typer.Option("--threads", help="CPU threads per model call and search (requests run one at a time).", min=1),
    ] = 1,
    generations: Annotated[Path | None, typer.Option("--generations", help=_GENERATIONS_HELP)] = None,
) -> None:
    """Serve a web page and a JSON API for searching an index (OpenAPI docs at /docs).

    The server answers only to the host names it is told (loopback by default), so a web page elsewhere cannot
    reach it through DNS rebinding. To share it on a LAN: listen on the LAN address, name it, and set a token:
    `cirlab serve INDEX --host 0.0.0.0 --allowed-host photos.lan --token-file ~/.cirlab-token`, then open
    http://photos.lan:8000/?token=<token> once per browser (it becomes a cookie); API clients send
    `Authorization: Bearer <token>`. A rebuilt index is picked up without a restart.

    Example: `cirlab serve runs/photos-index --port 8000`
    """
    import importlib.util
    import os

    import torch

    from cirlab._optional import require
    from cirlab.index import load_index
    from cirlab.serve import create_app
    from cirlab.serve.app import LOOPBACK_HOSTS

    uvicorn = require("uvicorn", extra="serve", purpose="cirlab serve")
    token = os.environ.get("CIRLAB_SERVE_TOKEN") or None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").splitlines()[0].strip() if token_file.is_file() else ""
        except (OSError, IndexError, UnicodeDecodeError):
            token = ""
        if not token:
            raise typer.BadParameter(f"{token_file}: no token in its first line", param_hint="--token-file")
    allowed = [*LOOPBACK_HOSTS, *(allowed_host or [])]
    if host not in ("0.0.0.0", "::", ""):
        allowed.append(host)
    # One query is one small forward pass and one search: extra threads buy little, and on a busy machine their
    # spin-waiting costs 50x (measured in benchmarks/README.md), so the default is one.
    torch.set_num_threads(threads)
    if importlib.util.find_spec("faiss") is not None:
        import faiss

        faiss.omp_set_num_threads(threads)
    from cirlab.generation import TextCache, default_generation_cache

    index = load_index(index_dir, text_cache=TextCache(generations or default_generation_cache()))
    loopback = host in LOOPBACK_HOSTS
    if not loopback and token is None:
        typer.echo(
            f"warning: listening on {host} without a token; anyone who can reach it and names an allowed host can "
            "search and view the gallery (set --token-file)",
            err=True,
        )
    if not loopback and not allowed_host:
        typer.echo(
            "warning: only loopback names and the --host address are allowed; pass --allowed-host NAME for the name "
            "clients use to reach this machine",
            err=True,
        )
    app = create_app(index, max_upload_bytes=int(max_upload_mb * (1 << 20)), allowed_hosts=allowed, token=token)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"{index.describe()}\nserving on http://{shown}:{port}/ (API docs: http://{shown}:{port}/docs)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    """Adds ``index build``, ``search`` and ``serve`` to the ``cirlab`` app."""
    app.add_typer(index_app, name="index")
    app.command("search")(search_cmd)
    app.command("serve")(serve_cmd)

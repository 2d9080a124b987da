"""What the demo shows a person: the results table (terminal and Markdown), a bar chart PNG and an HTML report
with example queries (reference, text, each method's top 5 with the true target marked).
"""

from __future__ import annotations

import base64
import html
import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from cirlab.data.images import load_image
from cirlab.evaluation.evaluate import compose_queries, gallery_embeddings, subset_split
from cirlab.evaluation.protocols import rank_split
from cirlab.io import atomic_path, atomic_write_text

COLUMNS = (
    ("cirr/test1", "all", "recall_at_1", "CIRR R@1"),
    ("cirr/test1", "all", "recall_at_5", "R@5"),
    ("cirr/test1", "all", "recall_subset_at_1", "Rs@1"),
    ("cirr/test1", "all", "avg", "Avg"),
    ("cirr/test1", "seen", "avg", "Avg seen"),
    ("cirr/test1", "heldout", "avg", "Avg held-out"),
    ("circo/test", "all", "map_at_10", "CIRCO mAP@10"),
    ("circo/test", "seen", "map_at_10", "mAP@10 seen"),
    ("circo/test", "heldout", "map_at_10", "mAP@10 held-out"),
)


def _cell(summary: dict[str, Any], split: str, part: str, key: str, with_std: bool) -> str:
    value = summary.get(split, {}).get(part, {}).get(key)
    if value is None:
        return "-"
    return f"{value['mean']:.1f} ± {value['std']:.1f}" if with_std else f"{value['mean']:.1f}"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (method, kind, metric columns); ± std when several seeds were run."""
    with_std = len(results["seeds"]) > 1
    header = ["method", "kind", *(c[3] for c in COLUMNS)]
    rows = []
    for name, r in results["methods"].items():
        rows.append([name, r["kind"], *(_cell(r["summary"], s, p, k, with_std) for s, p, k, _ in COLUMNS)])
    return header, rows


def print_table(results: dict[str, Any]) -> None:
    """Prints the results table with rich."""
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(results)
    seeds = results["seeds"]
    table = Table(title=f"Shapes test splits ({'quick' if results['quick'] else 'full'}, seeds {seeds}), %")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*row)
    # Wide enough for every column when output goes to a file or a pipe (rich would wrap headers at 80).
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)


def markdown_table(results: dict[str, Any]) -> str:
    """The results table as Markdown."""
    header, rows = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def chart_legend(draw: ImageDraw.ImageDraw, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
    """A row of (label, colour) swatches under a chart's title, as every cirlab bar chart draws them."""
    for j, (label, colour) in enumerate(entries):
        x = 10 + j * 150
        draw.rectangle([x, 26, x + 10, 36], fill=colour)
        draw.text((x + 14, 25), label, fill="black")


def save_percent_chart(img: Image.Image, left: int, width: int, top: int, path: str | Path) -> None:
    """Draws the 0-100 % grid of a horizontal bar chart from ``top`` down and writes the PNG atomically."""
    draw = ImageDraw.Draw(img)
    height = img.size[1]
    for x_val in (0, 25, 50, 75, 100):
        x = left + width * x_val // 100
        draw.line([x, top, x, height - 25], fill=(220, 220, 220))
        draw.text((x - 6, height - 20), str(x_val), fill="gray")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def bar_chart(results: dict[str, Any], path: str | Path) -> None:
    """A grouped horizontal bar chart (PNG): CIRR Avg and CIRCO mAP@10, seen vs held-out, per method."""
    bars = [
        ("cirr/test1", "seen", "avg", "CIRR Avg seen", (66, 133, 244)),
        ("cirr/test1", "heldout", "avg", "CIRR Avg held-out", (160, 196, 255)),
        ("circo/test", "seen", "map_at_10", "CIRCO mAP@10 seen", (234, 67, 53)),
        ("circo/test", "heldout", "map_at_10", "CIRCO mAP@10 held-out", (250, 170, 160)),
    ]
    names = list(results["methods"])
    bar_h, gap, left, width = 9, 10, 130, 420
    height = 50 + len(names) * (len(bars) * bar_h + gap) + 30
    img = Image.new("RGB", (left + width + 80, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), "Shapes test splits (%): seen vs held-out", fill="black")
    chart_legend(draw, [(label, colour) for _, _, _, label, colour in bars])
    y = 50
    for name in names:
        summary = results["methods"][name]["summary"]
        draw.text((10, y + bar_h), name, fill="black")
        for split, part, key, _, colour in bars:
            value = summary.get(split, {}).get(part, {}).get(key, {}).get("mean", 0.0)
            draw.rectangle([left, y, left + int(width * value / 100), y + bar_h - 2], fill=colour)
            draw.text((left + int(width * value / 100) + 4, y - 2), f"{value:.1f}", fill="black")
            y += bar_h
        y += gap
    save_percent_chart(img, left, width, 45, path)


@torch.no_grad()
def top_k(method: Any, split: Any, features: Any, indices: Sequence[int], k: int = 5) -> list[list[str]]:
    """Each selected query's top-k gallery names under the split's protocol (the reference removed for CIRR),
    ranked by the evaluator's own path (``protocols.rank_split``)."""
    sub = subset_split(split, indices)
    queries = compose_queries(method, sub, features)
    gallery = gallery_embeddings(method, split, features)
    top = rank_split(sub, queries, gallery, k, subsets=False).top  # (q, k)
    return [[split.gallery[i] for i in row] for row in top]


def _thumb(path: Path, size: int = 96) -> str:
    image = load_image(path).resize((size, size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def html_report(results: dict[str, Any], showcase: dict[str, Any], split: Any, path: str | Path) -> None:
    """A self-contained HTML page: the table, the chart and the showcase queries with each method's top 5."""
    header, rows = table_rows(results)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cirlab demo</title><style>",
        "body{font-family:sans-serif;margin:24px;color:#222} table{border-collapse:collapse;margin:12px 0}",
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right} td:first-child,th:first-child{text-align:left}",
        ".q{margin:18px 0;padding:10px;border:1px solid #ddd;border-radius:6px} .row{display:flex;gap:6px;",
        "align-items:center;margin:4px 0} .row span{width:110px;font-size:13px} img{border:3px solid transparent}",
        "img.hit{border-color:#2a2} img.ref{border-color:#888} .tag{font-size:12px;color:#a33}</style></head><body>",
        "<h1>cirlab demo: composed image retrieval on the Shapes world</h1>",
        f"<p>World <code>{html.escape(results['world'])}</code>, seeds {results['seeds']}, "
        f"{'quick' if results['quick'] else 'full'} run. Test splits only; checkpoints were chosen on validation.</p>",
        "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>",
        *("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows),
        "</table><img src='chart.png' alt='bar chart'>",
        "<h2>Example queries (CIRR-format test split)</h2>",
        "<p>Each row: a method's top 5; the true target has a green border.</p>",
    ]
    for item in showcase["queries"]:
        q = split.queries[item["index"]]
        flags = ", ".join(item["flags"]) or "seen"
        ref_img = _thumb(split.image_path(q.reference))
        parts.append(f"<div class='q'><div class='row'><span>reference</span><img class='ref' src='{ref_img}'>")
        parts.append(f"<b>&ldquo;{html.escape(q.text)}&rdquo;</b> <span class='tag'>{html.escape(flags)}</span></div>")
        target_img = _thumb(split.image_path(q.targets[0]))
        parts.append(f"<div class='row'><span>target</span><img class='hit' src='{target_img}'></div>")
        for name, ranked in item["top5"].items():
            cells = "".join(
                f"<img class='{'hit' if n == q.targets[0] else ''}' src='{_thumb(split.image_path(n))}' title='{n}'>"
                for n in ranked
            )
            parts.append(f"<div class='row'><span>{html.escape(name)}</span>{cells}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts))

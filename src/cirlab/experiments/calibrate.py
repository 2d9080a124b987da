"""``cirlab shapes-calibrate``: is the Shapes world an instrument that can tell CIR methods apart?

It measures, on validation and on test:

* the backbone: held-out-scene image->text and text->image Recall@1 (fresh scenes, canonical captions), and the
  *target-caption oracle*: each query's target described by its own canonical caption, retrieved by the text alone
  through the benchmark's own protocol (CIRR-format R@1/5/10 with the reference removed, CIRCO-format mAP@10);
  and the *reference-caption composition*: the reference's own canonical caption followed by the modification text,
  retrieved by the text alone. A pseudo-word method composes a token that stands for the reference inside the text
  tower; this row hands the tower a perfect stand-in, so it shows how far composing in text space can go on this
  backbone (a yardstick for the peers, measured rather than proven to bound them);
* the rows the published comparisons rest on: the training-free baselines (image-only, sum, text-only), the three
  peer zero-shot baselines (pic2word, searle, lincir) and the supervised CLIP4Cir combiner, over several seeds;

then marks each check of ``CHECKS`` pass or fail (on test, mean over seeds) and draws a chart. The checks encode
what a CIR benchmark must show to be trusted: the backbone sees one-attribute differences, the published order of
CIRR and CIRCO holds (image-only < sum < each peer < the supervised combiner), and there is headroom and
resolution (no method near the ceiling, a wide spread, small seed noise). The quick world is held to the order
checks only. Calibrate on validation; test is reported, never tuned on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from cirlab.data.benchmark import CIRQuery, CIRSplit
from cirlab.data.shapes import Scene, eval_caption
from cirlab.evaluation.evaluate import evaluate
from cirlab.experiments.report import chart_legend, save_percent_chart
from cirlab.experiments.shapes_env import ShapesEnv
from cirlab.experiments.study import Row, method_kind, run_study
from cirlab.methods import create_method
from cirlab.training.clip_pretrain import heldout_scenes, retrieval_recall

SPLITS: dict[str, tuple[str, str]] = {"val": ("cirr/val", "circo/val"), "test": ("cirr/test1", "circo/test")}
"""Per phase, the CIRR-format and the CIRCO-format split."""
ROWS: tuple[str, ...] = ("image-only", "sum", "text-only", "pic2word", "searle", "lincir", "combiner")
PEERS: tuple[str, ...] = ("pic2word", "searle", "lincir")
TRAINED: tuple[str, ...] = (*PEERS, "combiner")
CIRR_R1 = ("recall_at_1", "CIRR R@1")
CIRCO_MAP = ("map_at_10", "CIRCO mAP@10")


@dataclass(frozen=True)
class Thresholds:
    """The bars a calibrated world clears (full world, test split, mean over seeds; R@1 and mAP in %).

    Attributes:
        heldout_i2t_r1: held-out-scene image->text R@1 of the backbone.
        oracle_r1: target-caption oracle R@1 on the CIRR-format split.
        combiner_over_peers: the combiner's CIRR R@1 over the best peer's.
        max_r1: no row above this CIRR R@1 (headroom).
        min_spread: combiner minus sum, CIRR R@1 points (resolution).
        max_seed_std: the largest seed standard deviation of CIRR R@1 of a trained row.
    """

    heldout_i2t_r1: float = 95.0
    oracle_r1: float = 85.0
    combiner_over_peers: float = 1.5
    max_r1: float = 85.0
    min_spread: float = 10.0
    max_seed_std: float = 1.5


@dataclass(frozen=True)
class Check:
    """One check's outcome: what was compared, the measured value, the bar and whether it cleared it."""

    group: str
    name: str
    value: float
    bar: str
    passed: bool


def with_texts(split: CIRSplit, text: Callable[[CIRQuery], str]) -> CIRSplit:
    """The same split (gallery, targets, protocol) with each query's text replaced by ``text(query)``."""
    return dataclasses.replace(split, queries=[dataclasses.replace(q, text=text(q)) for q in split.queries])


def oracle_split(split: CIRSplit, meta: dict[str, dict[str, Any]]) -> CIRSplit:
    """The split with each query's text replaced by its target's canonical caption (``eval_caption``)."""
    return with_texts(split, lambda q: eval_caption(Scene.parse(meta[q.qid]["target_scene"])))


def composition_split(split: CIRSplit, meta: dict[str, dict[str, Any]]) -> CIRSplit:
    """The split with each query's text preceded by its reference's canonical caption ("<caption>, <text>")."""
    return with_texts(split, lambda q: f"{eval_caption(Scene.parse(meta[q.qid]['reference_scene']))}, {q.text}")


def backbone_report(env: ShapesEnv, eval_scenes: int = 1000) -> dict[str, Any]:
    """The backbone's held-out-scene retrieval, the target-caption oracle and the reference-caption composition on
    every calibration split."""
    images, captions = heldout_scenes(env.world.config.scene, env.world.config.render, eval_scenes)
    out: dict[str, Any] = {"heldout": retrieval_recall(env.backbone, images, captions)}
    oracle = create_method("text-only", env.backbone).eval()
    for phase, (cirr, circo) in SPLITS.items():
        for name in (cirr, circo):
            family, _, split = name.partition("/")
            meta = env.world.cirr_meta(split) if family == "cirr" else env.world.circo_meta(split)
            feats = env.source.features_for(oracle, name)
            split_ = env.source.split(name)
            out[f"oracle/{phase}/{family}"] = evaluate(oracle, oracle_split(split_, meta), feats).metrics
            out[f"composition/{phase}/{family}"] = evaluate(oracle, composition_split(split_, meta), feats).metrics
    return out


def _mean(results: dict[str, Any], row: str, split: str, key: str) -> float:
    return results["methods"][row]["summary"][split]["all"][key]["mean"]


def _std(results: dict[str, Any], row: str, split: str, key: str) -> float:
    return results["methods"][row]["summary"][split]["all"][key]["std"]


def checks(report: dict[str, Any], quick: bool, bars: Thresholds = Thresholds()) -> list[Check]:
    """Every check on the test phase (order checks only for the quick world)."""
    results, backbone = report["rows"], report["backbone"]
    cirr, circo = SPLITS["test"]
    out: list[Check] = []
    if not quick:
        i2t = backbone["heldout"]["i2t_r1"]
        oracle = backbone["oracle/test/cirr"]["recall_at_1"]
        out += [
            Check("backbone", "held-out-scene i2t R@1", i2t, f">= {bars.heldout_i2t_r1:g}", i2t >= bars.heldout_i2t_r1),
            Check(
                "backbone", "target-caption oracle CIRR R@1", oracle, f">= {bars.oracle_r1:g}", oracle >= bars.oracle_r1
            ),
        ]
    for split, (key, label) in ((cirr, CIRR_R1), (circo, CIRCO_MAP)):
        m = {row: _mean(results, row, split, key) for row in ROWS}
        out.append(
            Check("order", f"{label}: image-only < sum", m["sum"] - m["image-only"], "> 0", m["image-only"] < m["sum"])
        )
        for peer in PEERS:
            out.append(Check("order", f"{label}: sum < {peer}", m[peer] - m["sum"], "> 0", m["sum"] < m[peer]))
        best = max(m[p] for p in PEERS)
        out.append(Check("order", f"{label}: peers < combiner", m["combiner"] - best, "> 0", best < m["combiner"]))
    r1 = {row: _mean(results, row, cirr, CIRR_R1[0]) for row in ROWS}
    best_peer = max(r1[p] for p in PEERS)
    ratio = r1["combiner"] / best_peer if best_peer > 0 else float("inf")
    out.append(
        Check(
            "order",
            "combiner / best peer, CIRR R@1",
            ratio,
            f">= {bars.combiner_over_peers:g}x",
            ratio >= bars.combiner_over_peers,
        )
    )
    if quick:
        return out
    top = max(r1.values())
    spread = r1["combiner"] - r1["sum"]
    worst_std = max(_std(results, row, cirr, CIRR_R1[0]) for row in TRAINED)
    out += [
        Check("headroom", "highest CIRR R@1", top, f"<= {bars.max_r1:g}", top <= bars.max_r1),
        Check("headroom", "combiner - sum, CIRR R@1", spread, f">= {bars.min_spread:g}", spread >= bars.min_spread),
        Check(
            "headroom",
            "largest seed std of a trained row, CIRR R@1",
            worst_std,
            f"<= {bars.max_seed_std:g}",
            worst_std <= bars.max_seed_std,
        ),
    ]
    return out


def calibrate(
    env: ShapesEnv,
    seeds: Sequence[int],
    quick: bool,
    runs: Path,
    force: bool = False,
    log: Callable[[str], None] = print,
    jobs: int = 1,
) -> dict[str, Any]:
    """Measures the backbone and the calibration rows on validation and test (training ``jobs`` runs at a time,
    ``run_study``); returns the report with its checks."""
    log("backbone: held-out scenes and the target-caption oracle")
    backbone = backbone_report(env)
    rows = [Row(name, name, method_kind(name)) for name in ROWS]
    splits = [name for pair in SPLITS.values() for name in pair]
    results = run_study(env, rows, seeds, quick, runs, force, log, splits=splits, jobs=jobs)
    report = {"quick": quick, "seeds": list(seeds), "world": env.world.world_id, "backbone": backbone, "rows": results}
    report["checks"] = [dataclasses.asdict(c) for c in checks(report, quick)]
    report["passed"] = all(c["passed"] for c in report["checks"])
    return report


def calibration_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the backbone, the rows on validation and test, the checks."""
    b = report["backbone"]
    lines = [
        f"World `{report['world']}` ({'quick' if report['quick'] else 'full'}), seeds {report['seeds']}.",
        "",
        "| backbone | val | test |",
        "|---|---|---|",
        f"| held-out-scene i2t R@1 / t2i R@1 | {b['heldout']['i2t_r1']:.1f} / {b['heldout']['t2i_r1']:.1f} | (same) |",
    ]
    for key, label in (("recall_at_1", "R@1"), ("recall_at_5", "R@5"), ("recall_at_10", "R@10")):
        lines.append(f"| oracle CIRR {label} | {b['oracle/val/cirr'][key]:.1f} | {b['oracle/test/cirr'][key]:.1f} |")
    val, test = b["oracle/val/circo"]["map_at_10"], b["oracle/test/circo"]["map_at_10"]
    lines.append(f"| oracle CIRCO mAP@10 | {val:.1f} | {test:.1f} |")
    if "composition/val/cirr" in b:  # reports written before the row existed lack it
        val, test = b["composition/val/cirr"]["recall_at_1"], b["composition/test/cirr"]["recall_at_1"]
        lines.append(f"| reference caption + text, CIRR R@1 | {val:.1f} | {test:.1f} |")
        val, test = b["composition/val/circo"]["map_at_10"], b["composition/test/circo"]["map_at_10"]
        lines.append(f"| reference caption + text, CIRCO mAP@10 | {val:.1f} | {test:.1f} |")
    lines += [
        "",
        "| row | kind | val CIRR R@1 | val CIRCO mAP@10 | test CIRR R@1 | test CIRCO mAP@10 |",
        "|---|---|---|---|---|---|",
    ]
    results = report["rows"]
    for row in ROWS:
        cells = []
        for phase in ("val", "test"):
            for split, (key, _) in zip(SPLITS[phase], (CIRR_R1, CIRCO_MAP), strict=True):
                cells.append(f"{_mean(results, row, split, key):.1f} ± {_std(results, row, split, key):.1f}")
        lines.append(f"| {row} | {results['methods'][row]['kind']} | " + " | ".join(cells) + " |")
    lines += ["", "| check | measured | bar | |", "|---|---|---|---|"]
    for c in report["checks"]:
        lines.append(
            f"| {c['group']}: {c['name']} | {c['value']:.2f} | {c['bar']} | {'pass' if c['passed'] else 'FAIL'} |"
        )
    lines += ["", f"**{'All checks pass.' if report['passed'] else 'Some checks fail.'}**", ""]
    return "\n".join(lines)


def calibration_chart(report: dict[str, Any], path: str | Path) -> None:
    """A PNG: each row's CIRR R@1 and CIRCO mAP@10 on test (bars, ± seed std as whiskers), the oracle as a line."""
    results = report["rows"]
    cirr, circo = SPLITS["test"]
    bars = ((cirr, CIRR_R1[0], "CIRR R@1", (66, 133, 244)), (circo, CIRCO_MAP[0], "CIRCO mAP@10", (234, 67, 53)))
    left, width, bar_h, gap = 110, 440, 12, 10
    height = 60 + len(ROWS) * (2 * bar_h + gap) + 30
    img = Image.new("RGB", (left + width + 70, height), "white")
    draw = ImageDraw.Draw(img)
    verdict = "all checks pass" if report["passed"] else "some checks fail"
    draw.text((10, 8), f"Shapes calibration, test split (%): {verdict}", fill="black")
    chart_legend(draw, [(label, colour) for _, _, label, colour in bars])
    oracle = report["backbone"]["oracle/test/cirr"]["recall_at_1"]
    x_oracle = left + int(width * oracle / 100)
    draw.line([x_oracle, 45, x_oracle, height - 25], fill=(60, 160, 60))
    draw.text((x_oracle - 30, 44), "oracle R@1", fill=(60, 160, 60))
    y = 60
    for row in ROWS:
        draw.text((10, y + bar_h // 2), row, fill="black")
        for split, key, _, colour in bars:
            mean, std = _mean(results, row, split, key), _std(results, row, split, key)
            x = left + int(width * mean / 100)
            draw.rectangle([left, y, x, y + bar_h - 2], fill=colour)
            if std > 0:
                lo, hi = left + int(width * (mean - std) / 100), left + int(width * (mean + std) / 100)
                draw.line([lo, y + bar_h // 2, hi, y + bar_h // 2], fill="black")
            draw.text((x + 4, y), f"{mean:.1f}", fill="black")
            y += bar_h
        y += gap
    save_percent_chart(img, left, width, 55, path)

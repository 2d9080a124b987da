"""``cirlab demo``: every registered method trained with its Shapes preset and evaluated on the Shapes world's
CIRR- and CIRCO-format test splits, seen and held-out parts apart, with a few example queries' top 5 for the report.

It is the study of one plain row per method (:func:`cirlab.experiments.study.run_study`), so its runs are the
content-addressed runs every results script shares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cirlab.experiments.report import top_k
from cirlab.experiments.shapes_env import ShapesEnv
from cirlab.experiments.study import Row, method_kind, run_study
from cirlab.methods import METHODS


def default_methods() -> list[str]:
    """Every registered method but the generative ones, training-free first, the supervised upper bound last.

    The methods that run a captioner and a language model (CIReVL, LDRE, OSrCIR) are opt-in (``--method cirevl``):
    on the Shapes world they first train three stand-in models and then generate a text per query (fifteen for LDRE),
    which would make the demo several minutes slower (``benchmarks/results_training_free.py`` reports them).
    """
    names = [n for n in METHODS.list() if not METHODS.get(n).generators]
    return sorted(names, key=lambda n: (bool(METHODS.get(n).stages), METHODS.get(n).supervised, n))


def run_demo(
    env: ShapesEnv,
    out: str | Path = "runs/demo",
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    quick: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
    jobs: int = 1,
) -> dict[str, Any]:
    """Trains (or reuses) and evaluates every method, training ``jobs`` runs at a time (``run_study``); returns the
    results dict written to ``results.json``."""
    rows = [Row(name, name, method_kind(name)) for name in methods or default_methods()]
    split = env.source.split("cirr/test1")
    showcase = {"queries": showcase_queries(env)}
    picks = [q["index"] for q in showcase["queries"]]

    def collect_top5(row: Row, seed: int, method: Any) -> None:
        if seed != seeds[0]:
            return
        feats = env.source.features_for(method, "cirr/test1")
        for q, ranked in zip(showcase["queries"], top_k(method, split, feats, picks), strict=True):
            q["top5"][row.label] = ranked

    results = run_study(env, rows, seeds, quick, Path(out) / "methods", force, log, on_run=collect_top5, jobs=jobs)
    results["showcase"] = showcase
    return results


def showcase_queries(env: ShapesEnv, n_seen: int = 3, n_heldout: int = 3) -> list[dict[str, Any]]:
    """A handful of CIRR-format test queries for the report: the first seen and the first held-out ones."""
    subsets = env.source.subsets("cirr/test1")
    meta = env.world.cirr_meta("test1")
    split = env.source.split("cirr/test1")
    picks = subsets["seen"][:n_seen] + subsets["heldout"][:n_heldout]
    out = []
    for i in picks:
        m = meta[split.queries[i].qid]
        flags = [f for f in ("heldout_template", "heldout_combo") if m.get(f)]
        out.append({"index": i, "edit": m.get("edit_type"), "flags": flags, "top5": {}})
    return out

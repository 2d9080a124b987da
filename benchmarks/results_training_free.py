"""The training-free methods on the Shapes world: the baselines next to the generative ones (CIReVL, LDRE, OSrCIR),
with the quality of the stand-in captioner, rewriter and one-stage model those run, so a reader sees which part
limits them.

The table in docs/RESULTS.md (the full world, 3 seeds)::

    python benchmarks/results_training_free.py

It first trains (or reuses) the world's stand-in models (``cirlab.experiments.standins``: about a minute or two
each on two CPU cores) and measures their exact match; then evaluates every row. The generated texts of each run
are kept in ``<runs>/<method>-s<seed>-<key>/generations.jsonl``: a second run reads them all and runs no model.
CIReVL and OSrCIR decode greedily, so their three seeds agree; LDRE samples its captions with the seed.

Rows: image-only, text-only, sum, cirevl, ldre (relevance ensemble), osrcir, and LDRE with the plain mean ensemble
(an evaluation-time row: the same texts, another ensemble).
"""

from __future__ import annotations

from cirlab.experiments.shapes_env import ShapesEnv
from cirlab.experiments.standins import prepare_standins, quality_notes
from cirlab.experiments.study import Row, comparison_rows, study_main


def rows() -> list[Row]:
    """The training-free baselines, the generative methods, and LDRE's mean ensemble."""
    return [
        *comparison_rows(["image-only", "text-only", "sum", "cirevl", "ldre", "osrcir"]),
        Row("ldre: mean ensemble", "ldre", "ablation", evaluation=("ensemble=mean",)),
    ]


def standins(env: ShapesEnv, quick: bool) -> list[str]:
    """Builds (or reuses) the stand-ins before the rows run; their quality goes under the table."""
    return quality_notes(prepare_standins(env, quick).quality)


if __name__ == "__main__":
    raise SystemExit(
        study_main(
            None,
            script=__file__,
            title="Training-free methods, with a captioner and a language model or without",
            rows=rows,
            prepare=standins,
        )
    )

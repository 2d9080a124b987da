"""The baselines on the Shapes world (issue table for the zero-shot baselines and the supervised upper bound), with
diagnostic rows that say why a pseudo-word method does or does not beat ``sum``.

The table in docs/RESULTS.md (the full world, 3 seeds; reuses the runs of ``cirlab demo --seeds 3``)::

    python benchmarks/results_baselines.py

Rows: image-only, text-only, sum, pic2word, searle, searle-oti, lincir and the supervised combiner, each with its
Shapes preset.
Diagnostic rows (evaluation-time only, the same trained runs): each pseudo-word method queried with its pseudo-word
alone (``prompt=$``, no modification text), which measures how well ``phi`` maps an image into the text space
independently of whether the text tower can compose it with an edit it never read during pretraining.
"""

from __future__ import annotations

from cirlab.experiments.study import Row, comparison_rows, study_main

PSEUDO_WORD = ("pic2word", "searle", "searle-oti", "lincir")


def rows() -> list[Row]:
    """The baselines, then each pseudo-word method with its pseudo-word alone."""
    return [
        *comparison_rows(["image-only", "text-only", "sum", *PSEUDO_WORD, "combiner"]),
        *(Row(f"{name}: pseudo-word alone", name, "diagnostic", evaluation=("prompt=$",)) for name in PSEUDO_WORD),
    ]


if __name__ == "__main__":
    raise SystemExit(study_main(None, script=__file__, title="Baselines and the supervised upper bound", rows=rows))

"""Map-to-Compose on the Shapes world: the method against the baselines, and its ablations.

The full run (3 seeds; the world, its CLIP and the runs are built or reused)::

    python benchmarks/results_map_to_compose.py

The ablation table in docs/RESULTS.md (the small world, a quarter of the steps)::

    python benchmarks/results_map_to_compose.py --quick

Rows: map-to-compose against pic2word, searle, lincir, sum and the supervised combiner; ablations of
map-to-compose: no VSI (``method.use_vsi=false``), no soft alignment (``method.lambda_soft=0``), stage 1 only (the
full run evaluated with ``use_adapters=false``, which is exactly its stage-1 model because stage 2 trains nothing
else), stage 2 with 1% / 10% / 100% of the synthetic triplet file (``synthetic.fraction``; 100% is the preset) and
with 0% / 20% / 40% of the triplets corrupted (wrong target; ``synthetic.corrupt_fraction``; 0% is the preset).
Rows that change only stage 2 reuse the preset run's stage 1 (``cirlab.experiments.study``).
"""

from __future__ import annotations

from cirlab.experiments.study import Row, comparison_rows, study_main

M2C = "map-to-compose"


def rows() -> list[Row]:
    """The comparison rows, then the ablations; rows equal to the preset run say so and reuse it."""
    return [
        *comparison_rows(["sum", "pic2word", "searle", "lincir", M2C, "combiner"]),
        Row("m2c: no VSI", M2C, "ablation", ("method.use_vsi=false",)),
        Row("m2c: no soft alignment", M2C, "ablation", ("method.lambda_soft=0",)),
        Row("m2c: stage 1 only", M2C, "ablation", evaluation=("use_adapters=false",)),
        Row("m2c: synthetic 1%", M2C, "ablation", ("synthetic.fraction=0.01",)),
        Row("m2c: synthetic 10%", M2C, "ablation", ("synthetic.fraction=0.1",)),
        Row("m2c: synthetic 100% (= m2c)", M2C, "ablation"),
        Row("m2c: corrupted 0% (= m2c)", M2C, "ablation"),
        Row("m2c: corrupted 20%", M2C, "ablation", ("synthetic.corrupt_fraction=0.2",)),
        Row("m2c: corrupted 40%", M2C, "ablation", ("synthetic.corrupt_fraction=0.4",)),
    ]


if __name__ == "__main__":
    raise SystemExit(study_main(None, script=__file__, title="Map-to-Compose and its ablations", rows=rows))

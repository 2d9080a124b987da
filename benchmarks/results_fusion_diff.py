"""Fusion-Diff on the Shapes world: the method against the baselines, its ablations, and query latency.

The full run (3 seeds; the world, its CLIP and the runs are built or reused)::

    python benchmarks/results_fusion_diff.py

The ablation table in docs/RESULTS.md (the small world, a quarter of the steps)::

    python benchmarks/results_fusion_diff.py --quick

Rows: fusion-diff against map-to-compose, lincir, pic2word, sum and the supervised combiner; ablations of
fusion-diff: the stage-1 prior alone (the full run sampled with ``use_adapter=false``, exactly its stage-1 model
because stage 2 trains nothing else), the adapter trained without stage 1 (``method.adapter_from_scratch=true``:
the prior is trained jointly with it on the synthetic triplets), no guidance (``guidance_scale=1`` at sampling
time), 10 (the preset) vs 50 DDIM steps (sampling time), and stage 2 on 10% / 50% / 100% of the synthetic triplets
(``synthetic.fraction``; 100% is the preset; these reuse the preset run's stage 1). Sampling-time rows reuse the
preset's trained run. The last column is the query latency (ms per query on CPU: the whole evaluation of the
CIRR-format test split divided by its queries), since sampling costs steps.
"""

from __future__ import annotations

from cirlab.experiments.study import Row, comparison_rows, study_main

FD = "fusion-diff"


def rows() -> list[Row]:
    """The comparison rows, then the ablations; rows equal to the preset run say so and reuse it."""
    return [
        *comparison_rows(["sum", "pic2word", "lincir", "map-to-compose", FD, "combiner"]),
        Row("fd: stage-1 prior only", FD, "ablation", evaluation=("use_adapter=false",)),
        Row("fd: adapter without stage 1", FD, "ablation", ("method.adapter_from_scratch=true",)),
        Row("fd: no guidance", FD, "ablation", evaluation=("guidance_scale=1",)),
        Row("fd: 10 DDIM steps (= fd)", FD, "ablation"),
        Row("fd: 50 DDIM steps", FD, "ablation", evaluation=("ddim_steps=50",)),
        Row("fd: synthetic 10%", FD, "ablation", ("synthetic.fraction=0.1",)),
        Row("fd: synthetic 50%", FD, "ablation", ("synthetic.fraction=0.5",)),
        Row("fd: synthetic 100% (= fd)", FD, "ablation"),
    ]


if __name__ == "__main__":
    raise SystemExit(
        study_main(None, script=__file__, title="Fusion-Diff, its ablations and latency", rows=rows, latency=True)
    )

"""Default widths of attention modules that follow the backbone's embedding size."""

from __future__ import annotations


def heads_width(width: int, heads: int) -> int:
    """``width`` rounded up to a multiple of ``heads``, so the heads split it evenly.

    Widths that default to the embedding size ``d`` need it: ``d`` is odd for a CLIP with a modality gap (one extra
    dimension), and is a multiple of 8 for every real CLIP, where the default is unchanged.
    """
    if width < 1 or heads < 1:
        raise ValueError(f"width and heads must be at least 1, got {width} and {heads}")
    return -(-width // heads) * heads

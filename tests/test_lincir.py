"""LinCIR's self-masking: which parts of a training caption become the pseudo-word."""

from __future__ import annotations

import pytest

from cirlab.methods.lincir import LinCIR, LinCIRConfig

KEYWORDS = ["circle", "square", "red", "blue", "large", "big", "small"]


@pytest.mark.parametrize(
    ("mask", "caption", "masked"),
    [
        ("phrases", "A large red circle at the top and a small blue square below.", "$ at the top and $ below."),
        ("phrases", "top left: a big red circle", "top left: $"),
        ("phrases", "the circles are red", "the circles are $"),
        ("words", "A large red circle in the top left", "a $ $ $ in the top left"),
        ("phrases", "a photo of nothing", "a photo of $"),
    ],
)
def test_masking_replaces_each_keyword_phrase_or_word(tiny_backbone, mask, caption, masked):
    method = LinCIR(tiny_backbone, LinCIRConfig(keywords=KEYWORDS, mask=mask))
    assert method.mask_keywords(caption) == masked


def test_unknown_mask_mode_is_refused(tiny_backbone):
    with pytest.raises(ValueError, match="mask must be 'phrases' or 'words'"):
        LinCIR(tiny_backbone, LinCIRConfig(keywords=KEYWORDS, mask="nouns"))

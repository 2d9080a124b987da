"""LinCIR's self-masking: which parts of a training caption become the pseudo-word."""

from __future__ import annotations

import pytest
import torch

from cirlab.methods.lincir import LinCIR, LinCIRConfig

KEYWORDS = ["circle", "square", "red", "blue", "large", "big", "small"]


@pytest.mark.parametrize(
    ("mask", "caption", "masked"),
    [
        ("phrases", "A large red circle at the top and a small blue square below.", "$ at the top and $ below."),
        ("phrases", "top left: a big red circle", "top left: $"),
        ("phrases", "the circles are red", "the circles are $"),
        ("words", "A large red circle in the top left", "a $ $ $ in the top left"),
    ],
)
def test_masking_replaces_each_keyword_phrase_or_word(tiny_backbone, mask, caption, masked):
    method = LinCIR(tiny_backbone, LinCIRConfig(keywords=KEYWORDS, mask=mask))
    assert method.mask_keywords(caption.lower()) == masked  # captions reach the masking lower-cased


def test_unknown_mask_mode_is_refused(tiny_backbone):
    with pytest.raises(ValueError, match="mask must be 'phrases' or 'words'"):
        LinCIR(tiny_backbone, LinCIRConfig(keywords=KEYWORDS, mask="nouns"))


def test_a_caption_without_keywords_has_one_random_word_masked(tiny_backbone):
    method = LinCIR(tiny_backbone, LinCIRConfig(keywords=KEYWORDS))
    words = ["a", "photo", "of", "nothing"]
    masked = {method.mask_keywords("a photo of nothing", torch.Generator().manual_seed(s)) for s in range(20)}
    assert len(masked) > 1 and all(m.count("$") >= 1 for m in masked)
    assert all(sum(w != m for w, m in zip(words, x.split(), strict=True)) == 1 for x in masked)

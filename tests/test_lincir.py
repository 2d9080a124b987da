"""LinCIR's self-masking: which parts of a training caption become the pseudo-word."""

from __future__ import annotations

import re

import pytest
import torch

from cirlab.methods.lincir import MASKED_POS, LinCIR, LinCIRConfig

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


# --- the part-of-speech lexicon that stands in for spaCy on a closed vocabulary --------------------------------------

LEXICON = {"DET": ["a", "the"], "ADJ": ["large", "red", "blue"], "NOUN": ["circle", "top", "left", "square"]}


@pytest.mark.parametrize(
    ("caption", "runs", "masked"),
    [
        ("a large red circle at the top", ["a large red circle", "the top"], "$ at $"),
        ("top left: a large red circle", ["top left", "a large red circle"], "$ : $"),
        ("there is a blue square, at the top left", ["a blue square", "the top left"], "there is $ , at $"),
    ],
)
def test_a_pos_lexicon_masks_the_tagger_runs(tiny_backbone, caption, runs, masked):
    method = LinCIR(tiny_backbone, LinCIRConfig(pos_lexicon=LEXICON))
    assert method.masked_runs(caption) == runs
    assert method.mask_keywords(caption) == masked


def test_a_pos_lexicon_keeps_the_reference_string_replacement(tiny_backbone):
    # "the top" is replaced everywhere, inside "the top left" too; that run is still in the original caption, so it
    # is replaced in what is left, which no longer holds it: the stray "left" stays, as in the reference's loader.
    method = LinCIR(tiny_backbone, LinCIRConfig(pos_lexicon=LEXICON))
    caption = "a circle at the top and a square at the top left"
    assert method.masked_runs(caption) == ["a circle", "the top", "a square", "the top left"]
    for seed in range(3):
        assert method.mask_keywords(caption, torch.Generator().manual_seed(seed)) == "$ at $ and $ at $ left"


def test_a_pos_lexicon_reads_words_in_any_case_and_splits_punctuation(tiny_backbone):
    method = LinCIR(tiny_backbone, LinCIRConfig(pos_lexicon=LEXICON))
    assert method.masked_runs("Top left: a Red circle's top") == ["Top left", "a Red circle", "top"]
    assert method.masked_runs("") == [] and method.masked_runs(", :") == []


def test_a_pos_lexicon_gives_the_same_runs_as_a_spacy_pipeline_with_those_tags(tiny_backbone, tmp_path):
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("attribute_ruler")
    for pos, words in LEXICON.items():
        ruler.add([[{"LOWER": {"IN": words}}]], {"POS": pos})
    nlp.to_disk(tmp_path / "pos")
    tagged = LinCIR(tiny_backbone, LinCIRConfig(tagger=str(tmp_path / "pos")))
    lexicon = LinCIR(tiny_backbone, LinCIRConfig(pos_lexicon=LEXICON))
    for caption in ("top left: a large red circle, the blue square at the left", "a circle; the top", "red"):
        assert lexicon.masked_runs(caption) == tagged.masked_runs(caption)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"pos_lexicon": {"NOUNS": ["circle"]}}, "not a universal part-of-speech tag"),
        ({"pos_lexicon": {"NOUN": ["square"], "ADJ": ["square"]}}, "lists 'square' under NOUN and ADJ"),
        ({"pos_lexicon": LEXICON, "keywords": ["circle"]}, "at most one of tagger, pos_lexicon and keywords"),
        ({"pos_lexicon": LEXICON, "tagger": "en_core_web_sm"}, "at most one of tagger, pos_lexicon and keywords"),
        ({"pos_lexicon": {"NOUN": ["top left"]}}, "'top left' under NOUN is not a single word"),
        ({"pos_lexicon": {"NOUN": "circle"}}, "must list its words"),
        ({"pos_lexicon": LEXICON, "mask": "words"}, "mask 'words' applies to the keywords stand-in only"),
    ],
)
def test_a_malformed_pos_lexicon_is_refused(tiny_backbone, config, message):
    with pytest.raises(ValueError, match=message):
        LinCIR(tiny_backbone, LinCIRConfig(**config))


def test_the_shapes_preset_tags_every_word_of_the_world_captions(tiny_backbone):
    """Every word of the Shapes corpus captions is either tagged by the preset's lexicon or a word that spaCy tags
    outside the masked parts of speech; a new word in the caption grammar must be placed in one or the other."""
    import random

    from cirlab.data.shapes.corpus import caption_for
    from cirlab.data.shapes.world import SceneConfig, sample_scene
    from cirlab.experiments.runs import load_run_config

    unmasked = {
        "there",
        "is",
        "with",
        "showing",
        "of",
        "in",
        "at",
        "and",
        "among",
        "on",
        "them",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        ",",
        ":",
    }  # pronouns, verbs, prepositions, numbers, punctuation
    lexicon = load_run_config("lincir", "shapes").method.pos_lexicon
    tagged = {w for tag, words in lexicon.items() if tag in MASKED_POS for w in words}
    rng = random.Random(0)
    words = set()
    for _ in range(400):
        scene = sample_scene(rng, SceneConfig())
        for style in ("alt-text", "caption"):
            words |= {w for w in re.findall(r"[\w']+|[^\w\s]", caption_for(scene, rng, style).lower())}
    assert {"top", "circle", "red", "shapes"} <= words  # the sample reaches the grammar's place and attribute words
    assert words - tagged - unmasked == set()
    assert {"top", "left", "center", "photo", "scene"} <= tagged  # place phrases are masked, as spaCy's runs are
    method = LinCIR(tiny_backbone, LinCIRConfig(pos_lexicon=lexicon))
    assert method.masked_runs("top left: a big red circle among other shapes") == [
        "top left",
        "a big red circle",
        "other shapes",
    ]

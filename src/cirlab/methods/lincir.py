"""LinCIR (Gu et al., "Language-only Efficient Training of Zero-shot Composed Image Retrieval", CVPR 2024).

Known (public code, github.com/navervision/lincir): ``phi`` (SEARLE's shape, dropout 0.5) is trained from text
alone (``train_phi.py``, ``loader.py``):

* a caption is lower-cased, stripped of literal ``$`` and cut to the text encoder's context *first*; every maximal
  run of determiner / adjective / noun / proper-noun tokens (spaCy's ``en_core_web_sm`` tagger) is replaced by one
  ``$``, run by run, by string replacement; when a run is empty or no longer found, one random word of the caption
  is replaced instead and the rest skipped; a caption whose tokens then hold no ``$`` becomes ``"a photo of $"``;
* ``s = phi(t_raw(c) + sigma * eps)``, ``sigma ~ U[0, 1)`` per caption, ``eps ~ N(0, I)``, added to the *raw*
  (unnormalised) projected text embedding;
* loss = plain MSE (mean over elements) between the raw ``t(c)`` and ``t(c with every $ := s)``.

AdamW at a constant lr 1e-4, weight decay 0.01 on every parameter, no gradient clipping (``TrainConfig`` fields, set
by the ``cc3m-vitl14`` preset). Inference (``validate.py``): ``phi`` reads the raw image embedding;
``q = t("a photo of $ that {text}")``; FashionIQ averages the normalised queries of both caption orders.

Every setting is a ``LinCIRConfig`` field whose default is the public code's. Departures available as fields:
``tagger`` empty (no part-of-speech tagger) with either ``pos_lexicon`` (each word's part of speech read from a
lexicon, for a closed vocabulary such as the Shapes world's captions; the runs are then the tagger's runs) or
``keywords`` (runs of the listed words, with the article before them), ``mask: words`` (each keyword alone),
``normalize`` (noise and loss on L2-normalised embeddings), ``noise_max``, ``normalize_input`` (``phi`` reads the
normalised image embedding), the prompts and ``fashioniq_join``. A spaCy tagger needs the ``[pos]`` extra
and a pipeline (a package name such as ``en_core_web_sm``, or a folder written by ``nlp.to_disk``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cirlab._optional import require
from cirlab.methods.base import CIRMethod, Stage, register_method
from cirlab.modules.mappers import SearlePhi
from cirlab.modules.pseudo_word import encode_with_pseudo, prompt_query
from cirlab.placeholder import DEFAULT_PROMPT, PLACEHOLDER
from cirlab.types import ImageFeatures

# The parts of speech whose maximal runs LinCIR's loader masks (``extract_keywords_spacy``).
MASKED_POS = frozenset({"NOUN", "PROPN", "ADJ", "DET"})
# Universal dependencies' part-of-speech tags (spaCy's ``token.pos_``), the keys a ``pos_lexicon`` may use.
UPOS_TAGS = frozenset(
    [
        "ADJ",
        "ADP",
        "ADV",
        "AUX",
        "CCONJ",
        "DET",
        "INTJ",
        "NOUN",
        "NUM",
        "PART",
        "PRON",
        "PROPN",
        "PUNCT",
        "SCONJ",
        "SYM",
        "VERB",
        "X",
    ]
)
# How spaCy splits the Shapes captions: words, a possessive "'s", each punctuation mark on its own.
LEXICON_TOKEN = re.compile(r"\w+|'s\b|[^\w\s]")
RUN_CACHE_SIZE = 200_000


@dataclass
class LinCIRConfig:
    """Attributes:
    tagger: spaCy pipeline whose part-of-speech tags pick the masked runs (a package name or a folder); empty: the
        ``pos_lexicon`` or ``keywords`` stand-in.
    pos_lexicon: universal part-of-speech tag -> the words that carry it, standing in for the tagger on a closed
        vocabulary (a word listed nowhere has no tag, so it is never masked); the masked runs are the maximal runs
        of determiner / adjective / noun / proper-noun words, exactly as with the tagger.
    keywords: words masked when there is neither a tagger nor a ``pos_lexicon``.
    mask: with ``keywords``: "phrases" (each run of keywords, with the article before it, becomes one placeholder,
        as the tagger's runs do) or "words" (each keyword becomes a placeholder).
    fallback_prompt: the training text of a caption whose placeholder did not survive truncation.
    noise_max: upper bound of the per-caption noise scale. normalize: add the noise to, and compare, L2-normalised
        embeddings (the public code uses the raw ones).
    dropout: phi dropout. hidden: phi width (0: 4 d).
    normalize_input: ``phi`` reads the L2-normalised image embedding at inference (the public code: the raw one).
    prompt: query prompt (``{text}`` = modification). fashioniq_join: FashionIQ caption order (``both``: averaged).
    """

    tagger: str = ""
    pos_lexicon: dict[str, list[str]] = field(default_factory=dict)
    keywords: list[str] = field(default_factory=list)
    mask: str = "phrases"
    fallback_prompt: str = "a photo of $"
    noise_max: float = 1.0
    normalize: bool = False
    dropout: float = 0.5
    hidden: int = 0
    normalize_input: bool = False
    prompt: str = DEFAULT_PROMPT
    fashioniq_join: str = "both"


@register_method("lincir")
class LinCIR(CIRMethod):
    """LinCIR's phi trained on captions only, with noise on the text embedding."""

    config_class = LinCIRConfig
    stages = (Stage("mapping", "captions"),)

    def __init__(self, backbone: Any, config: LinCIRConfig | None = None) -> None:
        super().__init__(backbone, config)
        c = self.config
        self.phi = SearlePhi(backbone.embed_dim, backbone.token_dim, hidden=c.hidden or None, dropout=c.dropout)
        if c.mask not in ("phrases", "words"):
            raise ValueError(f"lincir: mask must be 'phrases' or 'words', got {c.mask!r}")
        if sum(map(bool, (c.tagger, c.pos_lexicon, c.keywords))) > 1:
            raise ValueError(
                "lincir: give at most one of tagger, pos_lexicon and keywords (to use keywords on a preset with a "
                "pos_lexicon, also set method.pos_lexicon={})"
            )
        if c.mask == "words" and not c.keywords:
            raise ValueError("lincir: mask 'words' applies to the keywords stand-in only; set method.keywords")
        self._pos: dict[str, str] = {}
        for tag, tag_words in c.pos_lexicon.items():
            if tag not in UPOS_TAGS:
                raise ValueError(f"lincir: pos_lexicon tag {tag!r} is not a universal part-of-speech tag")
            if isinstance(tag_words, str):
                raise ValueError(f"lincir: pos_lexicon {tag} must list its words, got the string {tag_words!r}")
            for word in tag_words:
                if not isinstance(word, str) or not re.fullmatch(r"\w+", word):
                    raise ValueError(f"lincir: pos_lexicon entry {word!r} under {tag} is not a single word")
                if self._pos.setdefault(word.lower(), tag) != tag:
                    raise ValueError(f"lincir: pos_lexicon lists {word!r} under {self._pos[word.lower()]} and {tag}")
        if PLACEHOLDER not in c.fallback_prompt:
            raise ValueError(f"lincir: fallback_prompt {c.fallback_prompt!r} has no placeholder {PLACEHOLDER!r}")
        words = sorted(c.keywords, key=len, reverse=True)
        self._keyword_re = None
        if words:
            keyword = "(?:" + "|".join(map(re.escape, words)) + ")"
            if c.mask == "phrases":
                keyword = rf"(?:(?:a|an|the)\s+)?{keyword}(?:\s+{keyword})*"
            self._keyword_re = re.compile(rf"\b{keyword}\b")
        self._nlp = None
        self._runs: dict[str, list[str]] = {}

    def _tagger(self):
        if self._nlp is None:
            spacy = require("spacy", extra="pos", purpose="LinCIR's part-of-speech masking (lincir.tagger)")
            try:
                self._nlp = spacy.load(self.config.tagger)
            except OSError as err:
                raise OSError(
                    f"lincir: cannot load the spaCy pipeline method.tagger={self.config.tagger!r} (install it, e.g. "
                    f"`python -m spacy download en_core_web_sm`, or give a folder written by nlp.to_disk): {err}"
                ) from err
        return self._nlp

    def masked_runs(self, caption: str) -> list[str]:
        """The runs of ``caption`` to mask, in order: maximal determiner/adjective/noun runs by the tagger (or the
        ``pos_lexicon``), or the keyword runs (or words) of the stand-in; computed once per caption."""
        if caption not in self._runs:
            if len(self._runs) >= RUN_CACHE_SIZE:
                self._runs.clear()  # a corpus of millions of captions would otherwise keep every one
            if self.config.tagger or self._pos:
                if self.config.tagger:
                    tagged = [(token.text, token.pos_) for token in self._tagger()(caption)]
                else:  # a word listed nowhere gets no masked tag, as a tagger's other parts of speech
                    tagged = [(w, self._pos.get(w.lower(), "X")) for w in LEXICON_TOKEN.findall(caption)]
                runs, current = [], []
                for text, pos in tagged:
                    if pos in MASKED_POS:
                        current.append(text)
                    elif current:
                        runs.append(" ".join(current))
                        current = []
                runs += [" ".join(current)] if current else []
            else:
                runs = [m.group(0) for m in self._keyword_re.finditer(caption)] if self._keyword_re else []
            self._runs[caption] = runs
        return self._runs[caption]

    def mask_keywords(self, caption: str, generator: torch.Generator | None = None) -> str:
        """``caption`` (already cleaned) with each masked run replaced by the placeholder, as LinCIR's loader does:
        run by run, by string replacement; at the first run that is empty or not in the caption (or when there is no
        run), one random word is replaced instead and the remaining runs are skipped.

        The placeholder is inserted as a word of its own (spaces around it, then collapsed): LinCIR inserts ``[$]``,
        a token of its own, whereas CLIP's BPE merges a bare ``$`` with the punctuation after it (``$.``, ``$)``)
        into a token that is not the placeholder."""
        masked, word_placeholder = caption, f" {PLACEHOLDER} "
        for run in self.masked_runs(caption) or [""]:
            if run and run in caption:
                masked = masked.replace(run, word_placeholder)
                continue
            words = caption.split(" ")
            word = words[int(torch.randint(len(words), (1,), generator=generator))]
            masked = masked.replace(word, word_placeholder) if word else f"{PLACEHOLDER} {masked}"
            break
        return " ".join(masked.split())

    def clean(self, captions: list[str]) -> list[str]:
        """Lower-cased, literal placeholders removed, stripped, then cut to the text encoder's context."""
        return self.backbone.truncate([c.lower().replace(PLACEHOLDER, "").strip() for c in captions])

    def training_texts(self, captions: list[str]) -> tuple[list[str], list[str]]:
        """``(cleaned captions, their masked texts)``; a masked text whose placeholder the tokenizer would cut off
        is replaced by ``fallback_prompt``."""
        cleaned = self.clean(captions)
        masked = [self.mask_keywords(c) for c in cleaned]
        ids = self.backbone.tokenize(masked).input_ids
        kept = (ids == self.backbone.placeholder_token_id).any(dim=1).tolist()
        return cleaned, [m if ok else self.config.fallback_prompt for m, ok in zip(masked, kept, strict=True)]

    def compose(self, reference: ImageFeatures, texts: list[str]) -> torch.Tensor:
        embeds = reference.embeds.float()
        pseudo = self.phi(F.normalize(embeds, dim=-1) if self.config.normalize_input else embeds)
        return prompt_query(self.backbone, self.config.prompt, texts, pseudo)

    def trainable_parameters(self, stage: str) -> list[torch.nn.Parameter]:
        self.stage(stage)
        return list(self.phi.parameters())

    def training_loss(self, stage: str, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        captions, masked = self.training_texts(batch["caption"])
        with torch.no_grad():
            target = self.backbone.encode_text(self.backbone.tokenize(captions)).embeds.float()  # (B, d), raw
        if self.config.normalize:
            target = F.normalize(target, dim=-1)
        sigma = torch.rand(len(captions), 1, device=target.device) * self.config.noise_max  # (B, 1)
        pseudo = self.phi(target + sigma * torch.randn_like(target))  # (B, w_t)
        pred = encode_with_pseudo(self.backbone, masked, pseudo).embeds.float()  # (B, d)
        if self.config.normalize:
            pred = F.normalize(pred, dim=-1)
        return {"loss": F.mse_loss(pred, target)}

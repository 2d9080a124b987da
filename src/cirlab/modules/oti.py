"""SEARLE's textual-inversion parts, shared by ``searle`` (the teacher of its ``phi``) and ``searle-oti`` (a method of
its own): the concept bank and Optimization-based Textual Inversion (OTI).

Read from the public code (github.com/miccunifi/SEARLE, ``src/image_concepts_association.py``,
``src/gpt_phrases_generation.py``, ``src/oti_inversion.py``):

* Concepts: a vocabulary of class names (Open Images v7's, ``data/oidv7-class-descriptions.csv``) embedded with an
  ensemble of prompt templates (each template's text embedding normalised, averaged, normalised again); an image's
  concepts are its ``top_k`` (15) nearest names by cosine similarity to its normalised image embedding.
* Phrases: per concept, language-model continuations of ``"a photo of {concept} that"`` (GPT-Neo 2.7B, 256 each);
  a concept with a phrase that does not contain it is never used.
* OTI: per image, a token ``s`` (init N(0, 0.02)) trained by AdamW (lr 2e-2, weight decay 0.01) for 350 steps on
  ``(cos_loss + 0.5 * gpt_loss) / 1.5``: ``cos_loss = 1 - cos(t(template with $ := s), v)`` with a random template
  per step, ``gpt_loss = 1 - cos(t(phrase with its concept := s), t(phrase))`` with a random phrase of the image's
  concepts; the output is the EMA (0.99) of ``s``. Images are optimised 32 at a time, independently.

Here (each a field of ``OTIConfig`` / ``ConceptConfig``): the vocabulary comes inline or from a file, and the phrases
from a JSON file (concept -> phrases, e.g. SEARLE's generated phrases converted to JSON) or, where no language model
is at hand (offline, the Shapes world), from a template family (``phrase_templates``), a stated stand-in.
Departures kept for batching: every image of a batch draws from one seeded stream (the same template, and the same
relative pick among its own phrases, at each step; the same initial token), and the loss is summed over images
rather than averaged, so that a token depends only on its image and the seed, never on the batch it was optimised
in; with Adam a sum and a mean give the same updates up to ``eps``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cirlab.config import budget_field
from cirlab.modules.pseudo_word import encode_with_pseudo, text_embeds
from cirlab.placeholder import PLACEHOLDER

# The 24 prompt templates SEARLE takes from PALAVRA (Cohen et al. 2022) for both concept scoring and OTI (``{}``
# is the concept or the pseudo-word).
PALAVRA_TEMPLATES: tuple[str, ...] = (
    *("This is a photo of a {}", "This photo contains a {}", "A photo of a {}", "This is an illustration of a {}"),
    *("This illustration contains a {}", "An illustrations of a {}", "This is a sketch of a {}"),
    *("This sketch contains a {}", "A sketch of a {}", "This is a diagram of a {}", "This diagram contains a {}"),
    *("A diagram of a {}", "A {}", "We see a {}", "{}", "We see a {} in this photo", "We see a {} in this image"),
    *("We see a {} in this illustration", "We see a {} photo", "We see a {} image", "We see a {} illustration"),
    *("{} photo", "{} image", "{} illustration"),
)

# A small everyday vocabulary for tests and quick checks; real runs read a large one from a file.
GENERIC_CONCEPTS: tuple[str, ...] = (
    *("person", "man", "woman", "child", "dog", "cat", "bird", "horse", "car", "bus", "train", "bicycle", "boat"),
    *("airplane", "table", "chair", "bed", "sofa", "food", "pizza", "cake", "fruit", "flower", "tree", "building"),
    *("street", "sky", "beach", "mountain", "water", "snow", "room", "kitchen", "shirt", "dress", "shoe", "bag"),
)


PHRASE_CACHE_SIZE = 50_000


def _squash(text: str) -> str:
    """Single spaces (templates put the pseudo-word between spaces, as the reference's ``" $ "`` does)."""
    return " ".join(text.split())


@dataclass
class ConceptConfig:
    """Where an image's concepts and their phrases come from.

    Attributes:
        vocabulary: concept names (used when ``vocabulary_file`` is empty).
        vocabulary_file: one name per line, or a CSV with a ``DisplayName`` column (SEARLE's
            ``data/oidv7-class-descriptions.csv``).
        templates: prompt templates (``{}`` = the concept) whose normalised text embeddings are averaged to embed
            a concept.
        top_k: concepts kept per image for OTI (``oti_inversion.py --top-k``: 15).
        phrases_file: JSON object concept -> list of phrases (language-model continuations; SEARLE's are those of
            GPT-Neo 2.7B for ``"a photo of {concept} that"``). Empty: ``phrase_templates``.
        phrase_templates: the stand-in phrase family (``{concept}`` = the concept) when there is no phrase file.
    """

    vocabulary: list[str] = field(default_factory=lambda: list(GENERIC_CONCEPTS))
    vocabulary_file: str = ""
    templates: list[str] = field(default_factory=lambda: list(PALAVRA_TEMPLATES))
    top_k: int = 15
    phrases_file: str = ""
    phrase_templates: list[str] = field(default_factory=lambda: ["a photo of {concept}"])


@dataclass
class OTIConfig:
    """Optimization-based Textual Inversion settings (defaults: SEARLE's ``oti_inversion.py``).

    Attributes:
        steps: optimisation steps per image (SEARLE: 350); a dry run caps it.
        lr: AdamW learning rate of the token.
        weight_decay: AdamW weight decay of the token.
        ema_decay: the returned token is this EMA of the optimised one.
        lambda_cos: weight of the image-template cosine loss.
        lambda_gpt: weight of the phrase regulariser.
        init_std: standard deviation of the initial token.
        batch_size: images optimised together (independent problems; only speed depends on it).
        templates: sentence templates (``{}`` = the pseudo-word) for the cosine loss.
        seed: seed of the initial token and of the template and phrase draws.
    """

    steps: int = budget_field(350, "steps")
    lr: float = 2e-2
    weight_decay: float = 0.01
    ema_decay: float = 0.99
    lambda_cos: float = 1.0
    lambda_gpt: float = 0.5
    init_std: float = 0.02
    batch_size: int = 32
    templates: list[str] = field(default_factory=lambda: list(PALAVRA_TEMPLATES))
    seed: int = 0


def read_vocabulary(path: str | Path) -> list[str]:
    """Concept names from a text file (one per line) or a CSV with a ``DisplayName`` column, stripped, deduplicated.

    Raises:
        FileNotFoundError / ValueError: naming the file when it is missing, has no ``DisplayName`` column or no name.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: concept vocabulary not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or "DisplayName" not in rows[0]:
            raise ValueError(f"{path}: a CSV vocabulary needs a DisplayName column")
        names = [r["DisplayName"] for r in rows]
    else:
        names = text.splitlines()
    names = list(dict.fromkeys(n.strip() for n in names if n and n.strip()))
    if not names:
        raise ValueError(f"{path}: no concept names")
    return names


def read_phrases(path: str | Path) -> dict[str, list[str]]:
    """A JSON object concept -> list of phrases.

    Raises:
        FileNotFoundError / ValueError: naming the file when it is missing or not such an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: phrase file not found")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(p, str) for p in v) for v in data.values()
    ):
        raise ValueError(f"{path}: expected a JSON object mapping each concept to a list of phrases")
    return {str(k).strip(): v for k, v in data.items()}


class ConceptBank:
    """The concept vocabulary embedded by a frozen backbone, with the usable phrases of each concept.

    Args:
        backbone: the frozen backbone that scores concepts and encodes phrases.
        config: where concepts and phrases come from.
    """

    def __init__(self, backbone, config: ConceptConfig) -> None:
        names = read_vocabulary(config.vocabulary_file) if config.vocabulary_file else list(config.vocabulary)
        if not names:
            raise ValueError("the concept vocabulary is empty (set concepts.vocabulary or concepts.vocabulary_file)")
        if not config.templates or config.top_k < 1:
            raise ValueError("concepts need at least one template and top_k >= 1")
        given = read_phrases(config.phrases_file) if config.phrases_file else None
        phrases = []
        for name in names:
            options = (
                given.get(name, [])
                if given is not None
                else [t.replace("{concept}", name) for t in config.phrase_templates]
            )
            # As SEARLE filters: a concept whose phrases do not all contain it cannot be replaced by the token.
            phrases.append([_squash(p) for p in options] if options and all(name in p for p in options) else [])
        self.names = names
        self.phrases = phrases
        self.usable = torch.tensor([bool(p) for p in phrases])  # (C,)
        if not self.usable.any():
            raise ValueError("no concept has phrases that contain it (check concepts.phrases_file)")
        self.top_k = config.top_k
        self._backbone = backbone
        # A small phrase set (a template family) is embedded once; a language model's (millions) on demand.
        every = list(dict.fromkeys(p for options in phrases for p in options))
        self._phrase_rows: dict[str, int] = {}
        self._phrase_embeds: torch.Tensor | None = None
        if len(every) <= PHRASE_CACHE_SIZE:
            with torch.no_grad():
                self._phrase_embeds = torch.cat(
                    [text_embeds(backbone, every[s : s + 1024]) for s in range(0, len(every), 1024)]
                )
            self._phrase_rows = {p: i for i, p in enumerate(every)}
        prompts = [_squash(t.replace("{}", f" {n} ")) for n in names for t in config.templates]
        with torch.no_grad():
            each = torch.cat([text_embeds(backbone, prompts[s : s + 1024]) for s in range(0, len(prompts), 1024)])
        # Each concept: the mean of its templates' normalised embeddings, normalised again.
        self.embeds = F.normalize(each.view(len(names), len(config.templates), -1).mean(1), dim=-1)  # (C, d)

    def candidates(self, image_embeds: torch.Tensor, top_k: int | None = None) -> list[list[int]]:
        """Per image, the usable concepts among its ``top_k`` nearest (default: the bank's ``top_k``; the nearest
        usable one when none is)."""
        v = F.normalize(image_embeds.float(), dim=-1)
        sims = v @ self.embeds.to(v.device).t()  # (B, C)
        top = sims.topk(min(top_k or self.top_k, sims.shape[1]), dim=1).indices.cpu()
        best_usable = sims.cpu().masked_fill(~self.usable, float("-inf")).argmax(dim=1)
        out = []
        for row, best in zip(top.tolist(), best_usable.tolist(), strict=True):
            kept = [c for c in row if self.usable[c]]
            out.append(kept or [best])
        return out

    def phrase_embeds(self, phrases: list[str]) -> torch.Tensor:
        """``norm(t(phrase))`` (B, d) of phrases of the bank, without gradient."""
        if self._phrase_embeds is not None:
            return self._phrase_embeds[torch.tensor([self._phrase_rows[p] for p in phrases])]
        with torch.no_grad():
            return text_embeds(self._backbone, phrases)

    def phrase_pair(self, concept: int, phrase: int, first_only: bool) -> tuple[str, str]:
        """``(phrase, phrase with its concept replaced by the placeholder)``; ``first_only`` replaces the first
        occurrence (SEARLE's OTI), else every one (SEARLE's ``phi`` training)."""
        name, text = self.names[concept], self.phrases[concept][phrase]
        masked = text.replace(name, f" {PLACEHOLDER} ", 1 if first_only else -1)
        return text, _squash(masked)


def oti_invert(
    backbone, image_embeds: torch.Tensor, bank: ConceptBank, config: OTIConfig, first_only: bool = True
) -> torch.Tensor:
    """OTI tokens (N, w_t) of images, optimised ``config.batch_size`` at a time (see the module docstring).

    Args:
        backbone: the frozen backbone (its text tower is differentiated through, its weights are not changed).
        image_embeds: raw image embeddings (N, d); the cosine loss ignores their scale.
        bank: concepts and phrases for the regulariser.
        config: OTI settings.
        first_only: the token goes to the first placeholder of a prompt only (SEARLE's encoder).

    Returns:
        The EMA tokens, float32, on ``image_embeds``' device.
    """
    if config.steps < 1 or config.batch_size < 1:
        raise ValueError("OTI needs steps >= 1 and batch_size >= 1")
    templates = [_squash(t.replace("{}", f" {PLACEHOLDER} ")) for t in config.templates]
    if not templates:
        raise ValueError("OTI needs at least one template")
    out = [
        _invert_batch(backbone, image_embeds[s : s + config.batch_size], bank, config, templates, first_only)
        for s in range(0, len(image_embeds), config.batch_size)
    ]
    return torch.cat(out) if out else image_embeds.new_zeros(0, backbone.token_dim)


def _invert_batch(
    backbone, v: torch.Tensor, bank: ConceptBank, config: OTIConfig, templates: list[str], first_only: bool
) -> torch.Tensor:
    n = v.shape[0]
    gen = torch.Generator().manual_seed(config.seed)
    init = torch.randn(backbone.token_dim, generator=gen) * config.init_std  # (w_t,), the same for every image
    token = torch.nn.Parameter(init.to(v.device).expand(n, -1).clone())  # (n, w_t)
    ema = token.detach().clone()
    optimizer = torch.optim.AdamW([token], lr=config.lr, weight_decay=config.weight_decay)
    candidates = bank.candidates(v)
    # Every image's phrase pool: the phrases of its candidate concepts (SEARLE draws uniformly from this pool).
    pools = [[(c, p) for c in cands for p in range(len(bank.phrases[c]))] for cands in candidates]
    target = F.normalize(v.detach().float(), dim=-1)  # (n, d)
    weight = config.lambda_cos + config.lambda_gpt
    with torch.enable_grad():
        for _ in range(config.steps):
            template = templates[int(torch.randint(len(templates), (1,), generator=gen))]
            pick = float(torch.rand(1, generator=gen))
            pairs = [bank.phrase_pair(*pool[int(pick * len(pool))], first_only=True) for pool in pools]
            optimizer.zero_grad(set_to_none=True)
            t_template = encode_with_pseudo(backbone, [template] * n, token, first_only).embeds.float()  # (n, d)
            cos_loss = 1 - (F.normalize(t_template, dim=-1) * target).sum(-1)  # (n,)
            loss = config.lambda_cos * cos_loss
            if config.lambda_gpt > 0:
                t_phrase = bank.phrase_embeds([p for p, _ in pairs]).to(v.device)  # (n, d)
                t_masked = encode_with_pseudo(backbone, [m for _, m in pairs], token, first_only).embeds.float()
                loss = loss + config.lambda_gpt * (1 - (F.normalize(t_masked, dim=-1) * t_phrase).sum(-1))
            (loss.sum() / weight).backward()
            optimizer.step()
            with torch.no_grad():
                ema.mul_(config.ema_decay).add_(token.detach(), alpha=1 - config.ema_decay)
    return ema

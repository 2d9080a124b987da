"""The Shapes world's text generators: small stand-ins for the pretrained captioners and language models that
CIReVL, LDRE and OSrCIR use, trained on data a zero-shot method may see.

The Shapes world has no pretrained captioner or language model, so each is trained here, cheaply (a minute or two
on two CPU cores for the full world), and saved as a transformers directory that loads through the real path
(``hf-captioner:<dir>``, ``hf-rewriter:<dir>``): the methods cannot tell them from BLIP-2 or a chat LLM.

- captioner: a vision-encoder-decoder model, a one-layer ViT whose patches are the world's grid cells (so each
  encoder token sees one cell) and a small GPT-2 decoder with cross-attention, trained together from scratch on the
  world's image-caption corpus: with the prompt ``shapes-describe`` it writes the canonical caption
  (``cirlab.data.shapes.eval_caption``); with ``canonical_fraction`` < 1 it also learns, without a prompt, the
  corpus' random phrasings (what a COCO-trained captioner samples), at the cost of more steps. Grid-cell patches
  make each encoder token one place an object can be (10 tokens instead of the CLIP's 65, so a step costs less),
  and keep the stand-ins independent of the Shapes CLIP; a decoder over the CLIP's frozen patch states learned no
  faster per step (1% caption exact match after 600 steps on the quick world, like the cell encoder then).
- rewriter: a small Llama with a chat template, trained on text triplets drawn from the world's synthetic triplet
  generator (``cirlab.data.shapes.synthetic``, its own template family; never a benchmark triplet or template): the
  ``shapes-rewrite`` prompt with the reference scene's caption (canonical or a random phrasing) and the synthetic
  modification text, answered by the target scene's canonical caption.
- reasoner (one-stage, OSrCIR): the captioner's architecture trained on synthetic triplets rendered by the world's
  renderer: the reference image and the ``shapes-one-stage`` prompt holding the modification text (the start of the
  decoder's sequence), answered by the target's canonical caption.

They share one byte-level BPE with a chat template (``cirlab.generation.tiny.chat_tokenizer``) trained on corpus
captions and synthetic texts. They are stand-ins: far smaller than the models the papers use, and they never read a
word of the benchmark's modification templates, which a pretrained language model would understand; say so wherever
their numbers are reported.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cirlab.data.shapes import ShapesWorld, caption, eval_caption
from cirlab.data.shapes.render import render_batch
from cirlab.data.shapes.synthetic import sample_synthetic_triplet
from cirlab.data.shapes.world import GRID, component_rng
from cirlab.generation.prompts import SHAPES_DESCRIBE, SHAPES_ONE_STAGE, SHAPES_REWRITE
from cirlab.generation.tiny import chat_tokenizer, clip_image_processor, vision_encoder_decoder
from cirlab.training.data import epoch_indices
from cirlab.training.loop import TrainConfig, train
from cirlab.training.run_config import scale_train

IGNORE = -100


@dataclass
class DecoderConfig:
    """A transformer's size. Attributes: width, layers, heads, positions (longest sequence)."""

    width: int = 64
    layers: int = 2
    heads: int = 4
    positions: int = 128


def _loop(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=32, lr=3e-3, weight_decay=0.01, log_every=100)


@dataclass
class CaptionerConfig:
    """Attributes:
    encoder: the cell ViT (its ``positions`` is unused: the grid fixes the tokens).
    decoder: the GPT-2 decoder.
    images: corpus images trained on (the first ones).
    canonical_fraction: examples with the describe prompt and the canonical caption; the rest have no prompt and
        a fresh random phrasing.
    train: the loop.
    """

    encoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(layers=1))
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    images: int = 20000
    canonical_fraction: float = 1.0
    train: TrainConfig = field(default_factory=lambda: _loop(2500))


@dataclass
class RewriterConfig:
    """Attributes:
    decoder: the Llama's size.
    examples: synthetic text triplets drawn (fresh draws of the synthetic generator, text only).
    canonical_fraction: examples whose reference caption is canonical; the rest a random phrasing.
    train: the loop.
    """

    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(positions=256))
    examples: int = 40000
    canonical_fraction: float = 1.0
    train: TrainConfig = field(default_factory=lambda: _loop(2500))


@dataclass
class ReasonerConfig:
    """Attributes:
    encoder: the cell ViT.
    decoder: the GPT-2 decoder.
    examples: synthetic triplets drawn and rendered.
    train: the loop.
    """

    encoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(layers=1))
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    examples: int = 20000
    train: TrainConfig = field(default_factory=lambda: _loop(2500))


@dataclass
class StandInConfig:
    """The three Shapes stand-ins.

    Attributes:
        vocab_size: the shared tokenizer's vocabulary (at most: the corpus' words and pieces are fewer).
        tokenizer_texts: corpus captions and synthetic texts the tokenizer is trained on (each).
        captioner / rewriter / reasoner: their settings.
        seed: initialisation and data seed.
    """

    vocab_size: int = 800
    tokenizer_texts: int = 20000
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    rewriter: RewriterConfig = field(default_factory=RewriterConfig)
    reasoner: ReasonerConfig = field(default_factory=ReasonerConfig)
    seed: int = 0

    def scaled(self, factor: float) -> StandInConfig:
        """Steps and data sizes scaled by ``factor`` (the quick world, tests); the models stay the same."""

        def size(n: int) -> int:
            return max(64, int(n * factor))

        return dataclasses.replace(
            self,
            tokenizer_texts=size(self.tokenizer_texts),
            captioner=dataclasses.replace(
                self.captioner, images=size(self.captioner.images), train=scale_train(self.captioner.train, factor)
            ),
            rewriter=dataclasses.replace(
                self.rewriter, examples=size(self.rewriter.examples), train=scale_train(self.rewriter.train, factor)
            ),
            reasoner=dataclasses.replace(
                self.reasoner, examples=size(self.reasoner.examples), train=scale_train(self.reasoner.train, factor)
            ),
        )


# -- data ---------------------------------------------------------------------------------------------------------
def synthetic_draws(world: ShapesWorld, n: int, stream: str) -> list[Any]:
    """``n`` fresh draws of the world's synthetic triplet generator (``SyntheticTriplet``: scenes, edit, its
    synthetic-template text), from their own random stream ``stream`` (never the world's own synthetic file's)."""
    rng = component_rng(world.config.seed, "standins", stream)
    return [sample_synthetic_triplet(rng, world.config.scene) for _ in range(n)]


def standin_tokenizer(world: ShapesWorld, cfg: StandInConfig) -> Any:
    """The stand-ins' tokenizer, trained on corpus captions (canonical and random phrasings), synthetic
    modification texts and the stand-ins' prompts."""
    corpus = world.corpus()
    rng = random.Random(f"standins/tokenizer/{cfg.seed}")
    n = min(cfg.tokenizer_texts, len(corpus))
    texts = [corpus.caption(i, rng) for i in range(n)] + [corpus.eval_caption(i) for i in range(n)]
    texts += [t.text for t in synthetic_draws(world, cfg.tokenizer_texts, "tokenizer")]
    texts += [
        p.replace("{caption}", "").replace("{text}", "") for p in (SHAPES_DESCRIBE, SHAPES_REWRITE, SHAPES_ONE_STAGE)
    ]
    return chat_tokenizer(texts, vocab_size=cfg.vocab_size)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _pad(rows: Sequence[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)  # (B, L), right-padded
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def decoder_example(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Decoder inputs and labels of one (prompt, answer): ``[start] prompt answer`` predicting ``prompt answer
    [eos]``, the prompt's positions unlabelled."""
    p, a = _ids(tokenizer, prompt), [*_ids(tokenizer, answer), tokenizer.eos_token_id]
    return [tokenizer.bos_token_id, *p, *a[:-1]], [IGNORE] * len(p) + a


def chat_example(tokenizer: Any, user: str, answer: str) -> tuple[list[int], list[int]]:
    """Causal-LM inputs and labels of one chat turn: the templated prompt (unlabelled) then the answer and eos."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    p, a = _ids(tokenizer, prompt), [*_ids(tokenizer, answer), tokenizer.eos_token_id]
    return p + a, [IGNORE] * len(p) + a


# -- models -------------------------------------------------------------------------------------------------------
def image_processor_for(world: ShapesWorld) -> Any:
    """The stand-ins' preprocessing as a transformers image processor: the world's image size, mean 0.5, std 0.25."""
    size = world.config.render.image_size
    return clip_image_processor(size, (0.5,) * 3, (0.25,) * 3)


def cell_encoder(world: ShapesWorld, cfg: DecoderConfig) -> Any:
    """A ``CLIPVisionModel`` whose patches are the world's grid cells (``GRID`` x ``GRID`` tokens and a class
    token): one token per place an object can be."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    size = world.config.render.image_size
    return CLIPVisionModel(
        CLIPVisionConfig(
            image_size=size,
            patch_size=size // GRID,
            hidden_size=cfg.width,
            intermediate_size=4 * cfg.width,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
        )
    )


def vision_model(world: ShapesWorld, tokenizer: Any, encoder: DecoderConfig, decoder: DecoderConfig, seed: int) -> Any:
    """A cell-encoder + GPT-2 vision-encoder-decoder model, initialised under ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        d = decoder
        return vision_encoder_decoder(tokenizer, cell_encoder(world, encoder), d.width, d.layers, d.heads, d.positions)


def _save(model: Any, tokenizer: Any, processor: Any | None) -> Callable[[Path], None]:
    def save(path: Path) -> None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        if processor is not None:
            processor.save_pretrained(path)

    return save


def _train_vision_decoder(
    model: Any,
    tokenizer: Any,
    processor: Any,
    images: np.ndarray,
    example: Callable[[int, random.Random], tuple[str, str]],
    tc: TrainConfig,
    out_dir: Path,
    description: str,
) -> Path:
    """Trains a vision-encoder-decoder model on uint8 images (N, H, W, 3); ``example(i, rng)`` is the (prompt,
    answer) of image ``i``. Images go through the saved image processor, as at inference."""

    def batch_fn(step: int, micro: int) -> dict[str, torch.Tensor]:
        idx = epoch_indices(len(images), tc.batch_size, step, micro, tc.grad_accum, tc.seed)
        rng = random.Random(f"{description}/{tc.seed}/{step}/{micro}")
        rows = [decoder_example(tokenizer, *example(int(i), rng)) for i in idx]
        pixels = processor(images=list(np.asarray(images[idx.numpy()])), return_tensors="pt")["pixel_values"]
        return {
            "pixels": pixels,
            "inputs": _pad([r[0] for r in rows], tokenizer.pad_token_id),
            "mask": _pad([[1] * len(r[0]) for r in rows], 0),
            "labels": _pad([r[1] for r in rows], IGNORE),
        }

    def loss_fn(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = model(
            pixel_values=batch["pixels"],
            decoder_input_ids=batch["inputs"],
            decoder_attention_mask=batch["mask"],
            labels=batch["labels"],
        )
        return {"loss": out.loss}

    model.train()
    params = list(model.parameters())
    train(
        model,
        params,
        batch_fn,
        loss_fn,
        tc,
        out_dir,
        save_fn=_save(model, tokenizer, processor),
        description=description,
    )
    return out_dir / "best"


def train_captioner(world: ShapesWorld, tokenizer: Any, cfg: StandInConfig, out_dir: str | Path) -> Path:
    """Trains the Shapes captioner on the caption corpus; returns its directory (``hf-captioner:<dir>``)."""
    cc = cfg.captioner
    corpus = world.corpus()
    n = min(cc.images, len(corpus))
    model = vision_model(world, tokenizer, cc.encoder, cc.decoder, cfg.seed)

    def example(i: int, rng: random.Random) -> tuple[str, str]:
        if rng.random() < cc.canonical_fraction:
            return SHAPES_DESCRIBE, corpus.eval_caption(i)
        return "", corpus.caption(i, rng)

    processor = image_processor_for(world)
    return _train_vision_decoder(
        model, tokenizer, processor, corpus.images[:n], example, cc.train, Path(out_dir), "captioner"
    )


def train_reasoner(world: ShapesWorld, tokenizer: Any, cfg: StandInConfig, out_dir: str | Path) -> Path:
    """Trains the Shapes one-stage model on rendered synthetic triplets; returns its directory."""
    rc = cfg.reasoner
    triplets = synthetic_draws(world, rc.examples, "reasoner")
    rng = component_rng(world.config.seed, "standins", "reasoner", "render")
    images = render_batch([(t.reference, rng.getrandbits(31)) for t in triplets], world.config.render)
    model = vision_model(world, tokenizer, rc.encoder, rc.decoder, cfg.seed)

    def example(i: int, rng: random.Random) -> tuple[str, str]:
        return SHAPES_ONE_STAGE.replace("{text}", triplets[i].text), eval_caption(triplets[i].target)

    processor = image_processor_for(world)
    return _train_vision_decoder(model, tokenizer, processor, images, example, rc.train, Path(out_dir), "reasoner")


def train_rewriter(world: ShapesWorld, tokenizer: Any, cfg: StandInConfig, out_dir: str | Path) -> Path:
    """Trains the Shapes rewriter on synthetic text triplets; returns its directory (``hf-rewriter:<dir>``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    wc = cfg.rewriter
    tc = wc.train
    triplets = synthetic_draws(world, wc.examples, "rewriter")
    d = wc.decoder
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d.width,
        intermediate_size=4 * d.width,
        num_hidden_layers=d.layers,
        num_attention_heads=d.heads,
        num_key_value_heads=d.heads,
        max_position_embeddings=d.positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)

    def example(i: int, rng: random.Random) -> tuple[list[int], list[int]]:
        t = triplets[i]
        said = eval_caption(t.reference) if rng.random() < wc.canonical_fraction else caption(t.reference, rng)
        user = SHAPES_REWRITE.replace("{caption}", said).replace("{text}", t.text)
        return chat_example(tokenizer, user, eval_caption(t.target))

    def batch_fn(step: int, micro: int) -> dict[str, torch.Tensor]:
        idx = epoch_indices(len(triplets), tc.batch_size, step, micro, tc.grad_accum, tc.seed)
        rng = random.Random(f"rewriter/{tc.seed}/{step}/{micro}")
        rows = [example(int(i), rng) for i in idx]
        return {
            "input_ids": _pad([r[0] for r in rows], tokenizer.pad_token_id),
            "attention_mask": _pad([[1] * len(r[0]) for r in rows], 0),
            "labels": _pad([r[1] for r in rows], IGNORE),
        }

    model.train()
    train(
        model,
        list(model.parameters()),
        batch_fn,
        lambda b: {"loss": model(**b).loss},
        tc,
        out_dir,
        save_fn=_save(model, tokenizer, None),
        description="rewriter",
    )
    return out_dir / "best"

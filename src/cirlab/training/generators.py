"""The Shapes world's text generators: small stand-ins for the pretrained captioners and language models that
CIReVL, LDRE and OSrCIR use, trained on data a zero-shot method may see.

The Shapes world has no pretrained captioner or language model, so each is trained here, cheaply (a minute or two
on two CPU cores for the full world), and saved as a transformers directory that loads through the real path
(``hf-captioner:<dir>``, ``hf-rewriter:<dir>``): the methods cannot tell them from BLIP-2 or a chat LLM.

- captioner: a vision-encoder-decoder model whose encoder is the Shapes CLIP's vision tower (copied, frozen; its
  states are computed once) and whose decoder is a small GPT-2 with cross-attention, trained on the world's
  image-caption corpus: with the prompt ``shapes-describe`` it writes the canonical caption
  (``cirlab.data.shapes.eval_caption``), without a prompt a random phrasing (the corpus' varied captions, what a
  COCO-trained captioner samples).
- rewriter: a small Llama with a chat template, trained on text triplets drawn from the world's synthetic triplet
  generator (``cirlab.data.shapes.synthetic``, its own template family; never a benchmark triplet or template): the
  ``shapes-rewrite`` prompt with the reference scene's caption (canonical or a random phrasing) and the synthetic
  modification text, answered by the target scene's canonical caption.
- reasoner (one-stage, OSrCIR): the captioner's architecture trained on synthetic triplets rendered by the world's
  renderer: the reference image and the ``shapes-one-stage`` prompt holding the modification text, answered by the
  target's canonical caption.

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
from cirlab.data.shapes.world import component_rng
from cirlab.generation.prompts import SHAPES_DESCRIBE, SHAPES_ONE_STAGE, SHAPES_REWRITE
from cirlab.generation.tiny import chat_tokenizer, clip_image_processor, vision_encoder_decoder
from cirlab.training.data import epoch_indices
from cirlab.training.loop import TrainConfig, train
from cirlab.training.run import scale_train

IGNORE = -100


@dataclass
class DecoderConfig:
    """A decoder's size. Attributes: width, layers, heads, positions (longest sequence)."""

    width: int = 128
    layers: int = 2
    heads: int = 4
    positions: int = 128


@dataclass
class CaptionerConfig:
    """Attributes:
    decoder: the GPT-2 decoder.
    images: corpus images trained on (the first ones; their encoder states are kept in memory).
    canonical_fraction: examples with the describe prompt and the canonical caption; the rest have no prompt and
        a fresh random phrasing.
    train: the loop (only the decoder trains).
    """

    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    images: int = 12000
    canonical_fraction: float = 0.5
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1200, batch_size=64, lr=2e-3, weight_decay=0.01, log_every=50)
    )


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
    canonical_fraction: float = 0.5
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1200, batch_size=64, lr=2e-3, weight_decay=0.01, log_every=50)
    )


@dataclass
class ReasonerConfig:
    """Attributes:
    decoder: the GPT-2 decoder.
    examples: synthetic triplets drawn and rendered (their reference images' encoder states are kept in memory).
    train: the loop (only the decoder trains).
    """

    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    examples: int = 12000
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1200, batch_size=64, lr=2e-3, weight_decay=0.01, log_every=50)
    )


@dataclass
class StandInConfig:
    """The three Shapes stand-ins.

    Attributes:
        vocab_size: the shared tokenizer's vocabulary.
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
def shapes_vision_encoder(backbone: Any) -> Any:
    """A ``CLIPVisionModel`` holding a copy of the Shapes CLIP's vision tower (``backbone.model`` is a
    ``transformers.CLIPModel``)."""
    from transformers import CLIPVisionModel

    clip = getattr(backbone, "model", None)
    if clip is None or not hasattr(clip, "vision_model"):
        raise TypeError(f"the stand-ins read a transformers CLIPModel's vision tower; {backbone.name} has none")
    encoder = CLIPVisionModel(clip.config.vision_config)
    encoder.load_state_dict(clip.vision_model.state_dict())
    return encoder


def image_processor_for(backbone: Any) -> Any:
    """The backbone's preprocessing as a transformers image processor (saved with the captioner)."""
    t = backbone.image_transform
    return clip_image_processor(t.size, t.mean, t.std)


@torch.no_grad()
def encoder_states(model: Any, processor: Any, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """The vision-encoder-decoder's (frozen) encoder states of uint8 images (N, H, W, 3): (N, T, w) float16."""
    out = []
    for s in range(0, len(images), batch_size):
        pixels = processor(images=list(np.asarray(images[s : s + batch_size])), return_tensors="pt")["pixel_values"]
        out.append(model.encoder(pixel_values=pixels).last_hidden_state.half())
    return torch.cat(out)


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
    states: torch.Tensor,
    example: Callable[[int, random.Random], tuple[str, str]],
    tc: TrainConfig,
    out_dir: Path,
    description: str,
) -> Path:
    """Trains the decoder (and the encoder-to-decoder projection, if any) of a vision-encoder-decoder model on
    cached encoder states; ``example(i, rng)`` is the (prompt, answer) of state row ``i``."""
    from transformers.modeling_outputs import BaseModelOutput

    for p in model.encoder.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]

    def batch_fn(step: int, micro: int) -> dict[str, torch.Tensor]:
        idx = epoch_indices(len(states), tc.batch_size, step, micro, tc.grad_accum, tc.seed)
        rng = random.Random(f"{description}/{tc.seed}/{step}/{micro}")
        rows = [decoder_example(tokenizer, *example(int(i), rng)) for i in idx]
        inputs = _pad([r[0] for r in rows], tokenizer.pad_token_id)
        return {
            "states": states[idx].float(),
            "inputs": inputs,
            "mask": _pad([[1] * len(r[0]) for r in rows], 0),
            "labels": _pad([r[1] for r in rows], IGNORE),
        }

    def loss_fn(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=batch["states"]),
            decoder_input_ids=batch["inputs"],
            decoder_attention_mask=batch["mask"],
            labels=batch["labels"],
        )
        return {"loss": out.loss}

    model.train()
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


def train_captioner(world: ShapesWorld, backbone: Any, tokenizer: Any, cfg: StandInConfig, out_dir: str | Path) -> Path:
    """Trains the Shapes captioner; returns its directory (loads as ``hf-captioner:<dir>``)."""
    cc = cfg.captioner
    corpus = world.corpus()
    n = min(cc.images, len(corpus))
    processor = image_processor_for(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        d = cc.decoder
        model = vision_encoder_decoder(
            tokenizer, shapes_vision_encoder(backbone), d.width, d.layers, d.heads, d.positions
        )
    states = encoder_states(model, processor, corpus.images[:n])

    def example(i: int, rng: random.Random) -> tuple[str, str]:
        if rng.random() < cc.canonical_fraction:
            return SHAPES_DESCRIBE, corpus.eval_caption(i)
        return "", corpus.caption(i, rng)

    return _train_vision_decoder(model, tokenizer, processor, states, example, cc.train, Path(out_dir), "captioner")


def train_reasoner(world: ShapesWorld, backbone: Any, tokenizer: Any, cfg: StandInConfig, out_dir: str | Path) -> Path:
    """Trains the Shapes one-stage model on rendered synthetic triplets; returns its directory."""
    rc = cfg.reasoner
    triplets = synthetic_draws(world, rc.examples, "reasoner")
    rng = component_rng(world.config.seed, "standins", "reasoner", "render")
    images = render_batch([(t.reference, rng.getrandbits(31)) for t in triplets], world.config.render)
    processor = image_processor_for(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        d = rc.decoder
        model = vision_encoder_decoder(
            tokenizer, shapes_vision_encoder(backbone), d.width, d.layers, d.heads, d.positions
        )
    states = encoder_states(model, processor, images)

    def example(i: int, rng: random.Random) -> tuple[str, str]:
        return SHAPES_ONE_STAGE.replace("{text}", triplets[i].text), eval_caption(triplets[i].target)

    return _train_vision_decoder(model, tokenizer, processor, states, example, rc.train, Path(out_dir), "reasoner")


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

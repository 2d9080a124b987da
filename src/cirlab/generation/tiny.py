"""Tiny random text generators saved as transformers directories, for tests and dry runs (offline, seconds on a CPU),
and the small byte-level BPE tokenizer with a chat template they (and the Shapes stand-ins) use.

Each ``save_tiny_*`` writes a directory that loads through the real path: ``hf-captioner:<dir>`` (a
vision-encoder-decoder captioner, a BLIP-2, a LLaVA with a chat template) or ``hf-rewriter:<dir>`` (a Llama with a
chat template).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from cirlab.backbones.tokenizer import BASIC_CORPUS

PAD, EOS, BOS = "<|pad|>", "<|endoftext|>", "<|startoftext|>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
IMAGE = "<image>"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>' }}{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""Role markers around each message (text, or a list of text and image parts), then the assistant's marker."""


def chat_tokenizer(texts: Iterable[str], vocab_size: int = 600, max_length: int = 512) -> Any:
    """A lower-casing byte-level BPE trained on ``texts`` with role and image tokens and ``CHAT_TEMPLATE``.

    Nothing is added around a text when it is tokenised (templates and trainers place the special tokens), so a
    prompt and its answer tokenised apart concatenate to exactly what generation sees.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, EOS, BOS, *ROLES, IMAGE]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[*ROLES, IMAGE],
        model_max_length=max_length,
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def _seeded(seed: int, build) -> Any:
    # Random init draws from the global generator; forking it keeps the caller's stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def vision_encoder_decoder(
    tokenizer: Any, encoder: Any, decoder_width: int, decoder_layers: int, decoder_heads: int, positions: int
) -> Any:
    """A ``VisionEncoderDecoderModel``: a vision tower (e.g. ``CLIPVisionModel``) and a GPT-2 decoder with
    cross-attention, its special tokens set for generation."""
    from transformers import GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderModel

    decoder = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=decoder_width,
            n_layer=decoder_layers,
            n_head=decoder_heads,
            n_positions=positions,
            add_cross_attention=True,
            is_decoder=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.decoder_start_token_id = tokenizer.bos_token_id
    return model


def clip_image_processor(size: int, mean: Iterable[float], std: Iterable[float]) -> Any:
    """A CLIP image processor (resize, centre crop to ``size``, normalise) with the PIL backend."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(mean),
        image_std=list(std),
    )


def save_tiny_captioner(path: str | Path, seed: int = 0) -> Path:
    """A tiny random vision-encoder-decoder captioner (32 px CLIP tower, 2-layer GPT-2 decoder), loads as
    ``hf-captioner:<path>``; a prompt is read as the start of its answer."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    path = Path(path)
    tokenizer = chat_tokenizer([BASIC_CORPUS], vocab_size=320)
    vision = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = _seeded(seed, lambda: vision_encoder_decoder(tokenizer, CLIPVisionModel(vision), 32, 2, 2, 128))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    clip_image_processor(32, (0.5,) * 3, (0.25,) * 3).save_pretrained(path)
    return path


def save_tiny_rewriter(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Llama with a chat template, loads as ``hf-rewriter:<path>``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = chat_tokenizer([BASIC_CORPUS], vocab_size=320)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _seeded(seed, lambda: LlamaForCausalLM(config)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_blip2(path: str | Path, seed: int = 0) -> Path:
    """A tiny random BLIP-2 (1-layer vision tower, Q-Former and OPT) with its processor, loads as
    ``hf-captioner:<path>``; the prompt precedes the answer, as BLIP-2 OPT's does."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    path = Path(path)
    tokenizer = chat_tokenizer([BASIC_CORPUS], vocab_size=320)
    tokenizer.chat_template = None  # BLIP-2 reads a plain prompt
    queries = 4
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    config = Blip2Config(
        vision_config={"image_size": 32, "patch_size": 8, **small},
        qformer_config={**small, "encoder_hidden_size": 32, "vocab_size": len(tokenizer)},
        text_config={
            "model_type": "opt",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "ffn_dim": 64,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        num_query_tokens=queries,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
    )
    _seeded(seed, lambda: Blip2ForConditionalGeneration(config)).save_pretrained(path)
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        num_query_tokens=queries,
    )
    processor.save_pretrained(path)
    return path


def save_tiny_llava(path: str | Path, seed: int = 0) -> Path:
    """A tiny random LLaVA (CLIP tower, Llama) with a processor and a chat template, loads as
    ``hf-captioner:<path>``: an image-text-to-text chat model."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    path = Path(path)
    tokenizer = chat_tokenizer([BASIC_CORPUS], vocab_size=320)
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 32,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 512,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    _seeded(seed, lambda: LlavaForConditionalGeneration(config)).save_pretrained(path)
    processor = LlavaProcessor(
        image_processor=clip_image_processor(32, (0.5,) * 3, (0.25,) * 3),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token=IMAGE,
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    return path

"""Small random-initialised backbones built offline, for tests and dry runs: the ``tiny`` CLIP, the Shapes world's
CLIP architecture and a tiny Qwen2.5-VL (``save_tiny_mllm``).

The CLIPs are ``transformers.CLIPModel`` instances wrapped by ``HFCLIPBackbone``, so saving one and loading it back
as ``hf-clip:<dir>`` exercises exactly the code path real checkpoints use; the tiny Qwen2.5-VL is saved as a
transformers directory and loads as ``mllm:<dir>`` the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cirlab.backbones.hf_clip import HFCLIPBackbone, gap_spec
from cirlab.backbones.tokenizer import BASIC_CORPUS, train_bpe_tokenizer
from cirlab.backbones.transforms import ImageTransform
from cirlab.registry import BACKBONES


@dataclass
class SmallCLIPConfig:
    """Architecture of a small CLIP (both towers pre-LN transformers, as in CLIP).

    Defaults are the ``tiny`` test backbone: 32 px images, a few layers, runs in milliseconds on a CPU.
    """

    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    mlp_ratio: int = 4
    embed_dim: int = 32
    context_length: int = 32
    vocab_size: int = 400
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    logit_scale_init: float = 2.6592  # log(1 / 0.07), CLIP's initial temperature
    # Std of the vision tower's initial position embeddings (transformers' CLIP: 0.02). A patch embedding of a
    # small model starts near 0.5, so at 0.02 the position is invisible beside the content, and it barely grows
    # with training: a small CLIP then cannot tell an object's place (see ``shapes_clip_model``).
    vision_position_init: float = 0.02


#: The architectures of public CLIP checkpoints, for benchmarks where only the model's size matters (speed does not
#: depend on the weights, which ``build_small_clip`` initialises at random). The tokenizer's vocabulary is small.
PUBLIC_SHAPES: dict[str, SmallCLIPConfig] = {
    "vit-b32": SmallCLIPConfig(  # openai/clip-vit-base-patch32
        image_size=224,
        patch_size=32,
        vision_width=768,
        vision_layers=12,
        vision_heads=12,
        text_width=512,
        text_layers=12,
        text_heads=8,
        embed_dim=512,
        context_length=77,
        vocab_size=1000,
    ),
    "vit-l14": SmallCLIPConfig(  # openai/clip-vit-large-patch14
        image_size=224,
        patch_size=14,
        vision_width=1024,
        vision_layers=24,
        vision_heads=16,
        text_width=768,
        text_layers=12,
        text_heads=12,
        embed_dim=768,
        context_length=77,
        vocab_size=1000,
    ),
}


def build_small_clip(cfg: SmallCLIPConfig, corpus: Iterable[str], seed: int = 0, name: str = "tiny") -> HFCLIPBackbone:
    """Builds a random-initialised CLIP and trains its byte-level BPE tokenizer on ``corpus``.

    Initialisation uses a forked RNG seeded with ``seed`` so the global torch RNG is left untouched.
    """
    from transformers import CLIPConfig, CLIPModel

    tokenizer = train_bpe_tokenizer(corpus, vocab_size=cfg.vocab_size, max_length=cfg.context_length)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.text_width,
        "intermediate_size": cfg.text_width * cfg.mlp_ratio,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.text_heads,
        "max_position_embeddings": cfg.context_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "projection_dim": cfg.embed_dim,
    }
    vision = {
        "hidden_size": cfg.vision_width,
        "intermediate_size": cfg.vision_width * cfg.mlp_ratio,
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": cfg.vision_heads,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "projection_dim": cfg.embed_dim,
    }
    config = CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=cfg.embed_dim,
        logit_scale_init_value=cfg.logit_scale_init,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
        if cfg.vision_position_init != 0.02:
            torch.nn.init.normal_(model.vision_model.embeddings.position_embedding.weight, std=cfg.vision_position_init)
    transform = ImageTransform(size=cfg.image_size, resize_to=cfg.image_size, mean=cfg.mean, std=cfg.std)
    return HFCLIPBackbone(model, tokenizer, transform, name=name)


@BACKBONES.register("tiny")
def tiny(weights: str | None = None, seed: int = 0, modality_gap: float = 0.0, **overrides: Any) -> HFCLIPBackbone:
    """A tiny random CLIP (32 px, 2+2 layers, width 32) for tests; ``weights`` is unused (always random);
    ``modality_gap`` as in ``HFCLIPBackbone``."""
    if weights:
        raise ValueError("the 'tiny' backbone is random-initialised and takes no weights; use hf-clip:<dir>")
    plain = build_small_clip(SmallCLIPConfig(**overrides), BASIC_CORPUS.split(" . "), seed=seed, name="tiny")
    if not modality_gap:
        return plain
    name = gap_spec("tiny", float(modality_gap))
    return HFCLIPBackbone(plain.model, plain.tokenizer, plain.image_transform, name=name, modality_gap=modality_gap)


def save_tiny_mllm(path: str | Path, seed: int = 0) -> Path:
    """Saves a tiny random Qwen2.5-VL to ``path`` (loads as ``mllm:<path>``): for tests and dry runs, offline.

    2 + 2 layers (vision tower, LLM), hidden size 64, 56 px images (one 2 x 2 merged token block), a small BPE
    tokenizer with Qwen's vision tokens and the PIL image processor; built in about a second on a CPU.

    Args:
        path: the directory to write (created if needed).
        seed: seed of the random weights (the global torch generator is left as it was).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from cirlab.backbones.mllm_space import VISION_TOKENS

    path = Path(path)
    tokenizer = train_bpe_tokenizer([BASIC_CORPUS], vocab_size=300, max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    start, end, pad = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "fullatt_block_indexes": [1],
        "window_size": 56,
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        vision_start_token_id=start,
        vision_end_token_id=end,
        image_token_id=pad,
        video_token_id=pad,
    )
    # Random init draws from the global generator; forking it keeps the caller's stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56).save_pretrained(path)
    return path

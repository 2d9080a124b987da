"""Shared fixtures: a tiny random backbone and its saved directory (everything offline, seconds on a CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: make any accidental hub access fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_backbone():
    """A frozen tiny CLIP (32 px, width 32); do not modify it in tests (it is shared)."""
    import torch

    import cirlab

    torch.set_num_threads(2)
    return cirlab.create_backbone("tiny").freeze()


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory, tiny_backbone) -> Path:
    """The tiny backbone saved with ``save_pretrained`` (loads as ``hf-clip:<dir>``)."""
    path = tmp_path_factory.mktemp("tiny-clip") / "model"
    tiny_backbone.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real benchmark annotation files beside the checkout; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark annotations not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def quick_shapes_root(tmp_path_factory) -> Path:
    """A root holding the quick Shapes world and its pretrained CLIP, built once per test session."""
    from cirlab.experiments.shapes_env import prepare_shapes

    root = tmp_path_factory.mktemp("shapes")
    prepare_shapes(quick=True, root=root, log=lambda message: None)
    return root


VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]


@pytest.fixture(scope="session")
def tiny_mllm_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL (2+2 layers, hidden size 64, 56 px images) with a small BPE tokenizer and the PIL
    image processor, saved (loads as ``mllm:<dir>``)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from cirlab.backbones.tokenizer import BASIC_CORPUS, train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tiny-qwen2.5-vl")
    tokenizer = train_bpe_tokenizer([BASIC_CORPUS], vocab_size=300, max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    start, end, pad = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56).save_pretrained(path)
    return path

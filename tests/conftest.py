"""Shared fixtures: a tiny random backbone and its saved directory (everything offline, seconds on a CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: make any accidental hub access fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

INTEGRATION_FIXTURES = {"quick_shapes_root"}
"""Fixtures that make a test end to end (the quick Shapes world and its CLIP): its users are marked ``integration``."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks every test that uses an end-to-end fixture ``integration``, wherever it lives, so the fast unit run
    (``-m "not slow and not integration"``) never builds the quick world."""
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


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


@pytest.fixture(scope="session")
def tiny_mllm_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL (``cirlab.backbones.tiny.save_tiny_mllm``), saved (loads as ``mllm:<dir>``)."""
    from cirlab.backbones.tiny import save_tiny_mllm

    return save_tiny_mllm(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


@pytest.fixture(scope="session")
def tiny_generators(tmp_path_factory) -> dict[str, Path]:
    """Tiny random text generators saved as transformers directories (``cirlab.generation.tiny``): a
    vision-encoder-decoder captioner, a BLIP-2, a LLaVA with a chat template and a Llama rewriter."""
    from cirlab.generation import tiny

    root = tmp_path_factory.mktemp("tiny-generators")
    return {
        "captioner": tiny.save_tiny_captioner(root / "captioner"),
        "blip2": tiny.save_tiny_blip2(root / "blip2"),
        "llava": tiny.save_tiny_llava(root / "llava"),
        "rewriter": tiny.save_tiny_rewriter(root / "rewriter"),
    }


@pytest.fixture(scope="session")
def generative_configs(tiny_generators) -> dict[str, dict]:
    """Config overrides that run each generative method (cirevl, ldre, osrcir) on the tiny random generators,
    briefly (a few tokens, 3 captions for LDRE)."""
    captioner = f"hf-captioner:{tiny_generators['captioner']}"
    rewriter = f"hf-rewriter:{tiny_generators['rewriter']}"
    short = {"max_new_tokens": 6}
    return {
        "cirevl": {
            "captioner": captioner,
            "caption_prompt": "none",
            "caption_sampling": {"num_beams": 2, **short},
            "rewriter": rewriter,
            "rewrite_prompt": "shapes-rewrite",
            "rewrite_sampling": short,
        },
        "ldre": {
            "captioner": captioner,
            "caption_prompt": "none",
            "caption_sampling": {"do_sample": True, "top_p": 0.9, "num_return_sequences": 3, **short},
            "rewriter": rewriter,
            "rewrite_prompt": "shapes-rewrite",
            "rewrite_sampling": short,
        },
        "osrcir": {"reasoner": captioner, "prompt": "shapes-one-stage", "sampling": short},
    }

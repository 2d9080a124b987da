"""Multimodal-LLM backbone (``mllm``): a Qwen2-VL / Qwen2.5-VL checkpoint through transformers, as a joint space.

Image, text and (image, text) pair are each wrapped in a prompt (E5-V style: "... in one word:") inside the
model's chat format; the embedding is the final hidden state of the prompt's last token, L2-normalised. Supported
families: Qwen2-VL and Qwen2.5-VL (``model_type`` ``qwen2_vl``, ``qwen2_5_vl``), e.g.
``mllm:Qwen/Qwen2.5-VL-72B-Instruct`` (the default) or ``mllm:path/to/dir``.

Two ways in:

- ``MLLMJointSpace`` (``cirlab.backbones.mllm_space``): PIL images and strings in, ``z`` out; images keep their
  aspect ratio.
- ``MLLMBackbone``: the same space behind the backbone protocol, so its embeddings are *features*: images go
  through a fixed-size ``image_transform`` (resize, centre crop to ``image_size``, a multiple of the vision
  tower's patch x merge size) and then the feature cache; ``encode_image`` returns ``z(I)`` with no patch tokens
  (the LLM's image tokens are no per-patch features a method could read), ``encode_text`` returns ``z(T)``, and
  ``encode_pair`` returns ``z(I, T)`` from the pair prompt.

The backbone is frozen: its spec rebuilds it with the default settings (``load_method`` passes nothing else), so a
checkpoint made with other settings must be loaded with the same backbone passed explicitly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cirlab.backbones.mllm_space import DEFAULT_MLLM, MLLMJointSpace, MLLMJointSpaceConfig
from cirlab.backbones.transforms import ImageTransform
from cirlab.placeholder import placeholder_token_id
from cirlab.registry import BACKBONES
from cirlab.types import ImageFeatures, TextFeatures, TokenBatch

if TYPE_CHECKING:
    from PIL import Image


def patchify(pixels: torch.Tensor, patch: int, merge: int, temporal: int) -> dict[str, torch.Tensor]:
    """Square normalised pixels (B, 3, S, S) as Qwen2-VL's vision tower reads them (its processor's layout).

    Each image is one frame repeated ``temporal`` times, cut into ``patch`` px patches ordered by ``merge`` x
    ``merge`` groups; returns ``pixel_values`` (B * g * g, 3 * temporal * patch * patch), g = S / patch, and
    ``image_grid_thw`` (B, 3).
    """
    b, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, gh/m, gw/m, m, m, C, p, p)
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)  # (B, gh/m, gw/m, m, m, C, T, p, p)
    values = x.reshape(b * gh * gw, c * temporal * patch * patch)
    grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long)  # (B, 3)
    return {"pixel_values": values, "image_grid_thw": grid}


class MLLMBackbone(nn.Module):
    """A multimodal LLM's joint space behind the backbone protocol (see ``cirlab.types.Backbone``).

    ``embed_dim``, ``token_dim`` and ``vision_width`` are all the LLM's hidden size: the embeddings are its final
    states, pseudo-words would enter as its input embeddings, and the image tokens it reads have its width (none is
    served: ``has_image_tokens`` is False, and methods that need patch tokens refuse this backbone).

    Args:
        space: the loaded joint space (its model becomes this module's ``model``).
        name: the spec this backbone was created from (for cache keys and configs).
    """

    has_image_tokens = False

    def __init__(self, space: MLLMJointSpace, name: str = "mllm") -> None:
        super().__init__()
        self.space = space
        self.model = space.model
        self.tokenizer = space.tokenizer
        self.name = name
        proc, size = space.image_processor, space.config.image_size
        self.patch = int(proc.patch_size)
        self.merge = int(proc.merge_size)
        self.temporal = int(proc.temporal_patch_size)
        if size % (self.patch * self.merge):
            raise ValueError(f"mllm image_size {size} must be a multiple of patch x merge = {self.patch * self.merge}")
        self.image_transform = ImageTransform(
            size=size,
            resize_to=size,
            mean=tuple(proc.image_mean),
            std=tuple(proc.image_std),
            resample=int(proc.resample),
        )
        self._fingerprint: str | None = None

    # -- dimensions -------------------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """Dimension of the joint space (the LLM's hidden size)."""
        return self.space.dim

    @property
    def token_dim(self) -> int:
        """Width of the LLM's input token embeddings."""
        return self.space.dim

    @property
    def vision_width(self) -> int:
        """Width of the image tokens the LLM reads (not served as features)."""
        return self.space.dim

    @property
    def placeholder_token_id(self) -> int:
        """The pseudo-word placeholder's token id; raises when this tokenizer splits the placeholder."""
        return placeholder_token_id(self.tokenizer)

    @property
    def device(self) -> torch.device:
        """Where inputs go."""
        return self.space.device

    def image_encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter: ``z(I)`` is the LLM's final state, so the whole model is the image encoder."""
        return self.model.parameters()

    # -- text ---------------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> TokenBatch:
        """The text prompt around each text, chat-wrapped, right-padded (B, L)."""
        prompt = self.space.config.text_prompt
        return self.space.pad([self.space.prompt_ids(prompt, s, None) for s in texts])

    def truncate(self, texts: list[str]) -> list[str]:
        """``texts`` unchanged: the LLM's context holds any caption (nothing is truncated by ``tokenize``)."""
        return list(texts)

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids, (B, L) -> (B, L, token_dim)."""
        return self.model.get_input_embeddings()(input_ids)

    def encode_text_embeds(self, input_embeds: torch.Tensor, tokens: TokenBatch) -> TextFeatures:
        """Runs the LLM from input embeddings of tokenised prompts; ``embeds`` is ``z(T)`` (B, embed_dim)."""
        states, z = self.space.hidden_states(tokens, inputs_embeds=input_embeds)
        return TextFeatures(z, states, tokens.attention_mask)

    def encode_text(self, tokens: TokenBatch | list[str]) -> TextFeatures:
        """``z(T)`` (B, embed_dim), L2-normalised, of tokenised prompts (or raw strings), with the final states."""
        if not isinstance(tokens, TokenBatch):
            tokens = self.tokenize(tokens)
        return self.encode_text_embeds(self.token_embeddings(tokens.input_ids), tokens)

    # -- images -------------------------------------------------------------------------------------------------
    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> normalised pixels (B, 3, S, S) on the backbone's device."""
        return self.image_transform(images).to(self.device)

    def _embed_pixels(self, pixels: torch.Tensor, texts: Sequence[str] | None) -> torch.Tensor:
        """``z(I)`` or ``z(I, T)`` (B, embed_dim) of square pixels, ``batch_size`` prompts per forward pass."""
        step = self.space.config.batch_size
        out = []
        for start in range(0, pixels.shape[0], step):
            images = patchify(pixels[start : start + step].float(), self.patch, self.merge, self.temporal)
            out.append(self.space.embed_inputs(images, texts[start : start + step] if texts is not None else None))
        return torch.cat(out) if out else pixels.new_zeros(0, self.embed_dim)

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        """``z(I)`` (B, embed_dim), L2-normalised, of pixels (B, 3, S, S); no patch tokens (B, 0, embed_dim)."""
        z = self._embed_pixels(pixels, None)
        return ImageFeatures(z, z.new_zeros(z.shape[0], 0, self.embed_dim))

    def encode_pair(self, pixels: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """``z(I, T)`` (B, embed_dim), L2-normalised, from the pair prompt over pixels (B, 3, S, S) and texts."""
        if pixels.shape[0] != len(texts):
            raise ValueError(f"{pixels.shape[0]} images but {len(texts)} texts")
        return self._embed_pixels(pixels, list(texts))

    # -- state ---------------------------------------------------------------------------------------------------
    def freeze(self) -> MLLMBackbone:
        """Turns off gradients for every parameter and switches to eval mode; returns self."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def identity(self) -> str:
        """Identity of what determines the features: weights, prompts, dtype and preprocessing (cache keys).

        The weights enter through a strided sample of every tensor (name, shape, dtype and up to 4096 values),
        computed once: hashing all of a 72B model would take minutes, and fine-tuned weights differ everywhere.
        """
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=12)
            for key, tensor in sorted(self.model.state_dict().items()):
                flat = tensor.detach().reshape(-1)
                h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                h.update(flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float32).numpy().tobytes())
            c = self.space.config
            prompts = [c.image_prompt, c.text_prompt, c.pair_prompt, c.chat_format, c.image_marker, c.dtype]
            h.update(json.dumps(prompts).encode())
            self._fingerprint = f"{self.name}@{h.hexdigest()}"
        return f"{self._fingerprint}/{self.image_transform.identity()}"

    def save_pretrained(self, path: str | Path) -> None:
        raise NotImplementedError("mllm backbones are frozen and loaded by hub id or directory; methods save the rest")


@BACKBONES.register("mllm")
def mllm(weights: str = DEFAULT_MLLM, **kwargs: Any) -> MLLMBackbone:
    """A Qwen2-VL / Qwen2.5-VL joint space: ``mllm:Qwen/Qwen2.5-VL-72B-Instruct`` or ``mllm:<dir>``.

    Keyword arguments that name ``MLLMJointSpaceConfig`` fields (``dtype``, ``image_size``, ``device_map``,
    prompts, ...) set them; the rest go to transformers' ``from_pretrained`` (e.g. ``revision``).
    """
    fields = {f.name for f in dataclasses.fields(MLLMJointSpaceConfig)} - {"model_id"}
    config = MLLMJointSpaceConfig(model_id=weights, **{k: v for k, v in kwargs.items() if k in fields})
    hub_kwargs = {k: v for k, v in kwargs.items() if k not in fields}
    return MLLMBackbone(MLLMJointSpace.from_pretrained(config, **hub_kwargs), name=f"mllm:{weights}")

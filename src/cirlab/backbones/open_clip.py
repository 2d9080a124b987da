"""open_clip backbone (``open-clip``), an optional extra: ``pip install 'cirlab[openclip]'``.

``open-clip:ViT-B-32`` builds the architecture with random weights (``pretrained=None``, works offline);
``open-clip:ViT-L-14@laion2b_s32b_b82k`` names open_clip pretrained weights (downloaded by open_clip when online).
open_clip needs torchvision, which has no working CPU build on some machines; the import error says so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image
from torch import nn

from cirlab._optional import require
from cirlab.backbones.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform
from cirlab.placeholder import PLACEHOLDER
from cirlab.registry import BACKBONES
from cirlab.types import ImageFeatures, TextFeatures, TokenBatch


class OpenCLIPBackbone(nn.Module):
    """An open_clip ``CLIP`` model behind the cirlab backbone protocol (text tower re-run from embeddings)."""

    has_image_tokens = True

    def __init__(self, model: Any, tokenizer: Any, transform: ImageTransform, name: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_transform = transform
        self.name = name
        ids = tokenizer([PLACEHOLDER])[0]
        inner = [int(i) for i in ids.tolist() if i not in (0, ids[0].item())]
        self.placeholder_token_id = inner[0]
        self.context_length = int(model.context_length)
        self.model.visual.output_tokens = True
        self._fingerprint: str | None = None

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def token_dim(self) -> int:
        return int(self.model.token_embedding.weight.shape[1])

    @property
    def vision_width(self) -> int:
        return int(self.model.visual.transformer.width)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def image_encoder_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.visual.parameters()

    def tokenize(self, texts: list[str]) -> TokenBatch:
        ids = self.tokenizer(list(texts)).to(self.model.logit_scale.device)  # (B, context_length)
        return TokenBatch(ids, (ids != 0).long())

    def truncate(self, texts: list[str]) -> list[str]:
        """``texts`` cut to the tokens the context holds, decoded back to text (open_clip's BPE tokenizer)."""
        keep = self.context_length - 2
        out = []
        for text in texts:
            ids = self.tokenizer.encode(text)
            out.append(text if len(ids) <= keep else self.tokenizer.decode(ids[:keep]).strip())
        return out

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(input_ids)

    def encode_text_embeds(self, input_embeds: torch.Tensor, tokens: TokenBatch) -> TextFeatures:
        m = self.model
        x = input_embeds + m.positional_embedding.to(input_embeds.dtype)  # (B, L, w_t)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.input_ids.argmax(dim=-1)]
        return TextFeatures(pooled @ m.text_projection, x, tokens.attention_mask)

    def encode_text(self, tokens: TokenBatch | list[str]) -> TextFeatures:
        if not isinstance(tokens, TokenBatch):
            tokens = self.tokenize(tokens)
        return self.encode_text_embeds(self.token_embeddings(tokens.input_ids), tokens)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.image_transform(images).to(self.model.logit_scale.device)

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        pooled, patches = self.model.visual(pixels)  # (B, d), (B, n, w_v)
        return ImageFeatures(pooled, patches)

    def freeze(self) -> OpenCLIPBackbone:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def identity(self) -> str:
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=12)
            for key, tensor in sorted(self.model.visual.state_dict().items()):
                h.update(key.encode())
                h.update(tensor.detach().cpu().float().numpy().tobytes())
            self._fingerprint = f"{self.name}@{h.hexdigest()}"
        return f"{self._fingerprint}/{self.image_transform.identity()}"

    def save_pretrained(self, path: Any) -> None:
        raise NotImplementedError("open-clip backbones are loaded by name; fine-tuned weights are saved by methods")


@BACKBONES.register("open-clip")
def open_clip_backbone(weights: str = "ViT-B-32", **kwargs: Any) -> OpenCLIPBackbone:
    """open_clip model ``ARCH`` or ``ARCH@PRETRAINED`` (random weights when no ``@PRETRAINED`` is given)."""
    open_clip = require("open_clip", extra="openclip", purpose="the open-clip backbone")
    arch, _, pretrained = weights.partition("@")
    model = open_clip.create_model(arch, pretrained=pretrained or None, **kwargs).eval()
    tokenizer = open_clip.get_tokenizer(arch)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN)
    std = tuple(getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD)
    transform = ImageTransform(size=size, resize_to=size, mean=mean, std=std)
    return OpenCLIPBackbone(model, tokenizer, transform, name=f"open-clip:{weights}")

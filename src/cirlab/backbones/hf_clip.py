"""Hugging Face CLIP backbone (``hf-clip``): ``transformers.CLIPModel`` + its tokenizer + PIL preprocessing.

``hf-clip:openai/clip-vit-large-patch14`` loads from the hub (real code path; nothing can be downloaded in
offline environments), ``hf-clip:path/to/dir`` from a local directory written by ``save_pretrained``. The tiny test
backbone and the Shapes world's CLIP are this same class with small configs, so every code path is exercised.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from cirlab.backbones.transforms import ImageTransform
from cirlab.io import create_temp_dir, replace_dir
from cirlab.placeholder import placeholder_token_id
from cirlab.registry import BACKBONES
from cirlab.types import ImageFeatures, TextFeatures, TokenBatch

PREPROCESSOR_FILE = "preprocessor_config.json"


def _no_cache(create_causal_mask: Any) -> dict[str, None]:
    """The "no KV cache" argument of ``transformers.masking_utils.create_causal_mask`` under the name this release
    uses: transformers renamed ``past_key_values`` to ``cache`` (5.2x) and warns on every call with the old name,
    which filled a server's log with one warning per query."""
    params = inspect.signature(create_causal_mask).parameters
    return {"cache": None} if "cache" in params else {"past_key_values": None}


@contextmanager
def _local_bars_off(local: bool) -> Iterator[None]:
    """Turns transformers' progress bars off while a local directory is read or written: it draws one per load and
    save ("Loading weights", "Writing model shards") that finishes in milliseconds and only fills logs, once per
    trained run of a study. Hub downloads keep their bars. The previous setting is restored."""
    from transformers.utils import logging as hf_logging

    quiet = local and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


class HFCLIPBackbone(nn.Module):
    """A CLIP dual encoder exposing the cirlab backbone protocol (see ``cirlab.types.Backbone``).

    Args:
        model: a ``transformers.CLIPModel``.
        tokenizer: the matching transformers tokenizer.
        transform: image preprocessing (size, mean and std of the checkpoint).
        name: the spec this backbone was created from (for cache keys and configs).
        modality_gap: length ``c`` of an offset shared by every L2-normalised text embedding, along one extra
            dimension that no image embedding has (0: none, the joint space is the checkpoint's). Real CLIPs keep
            their two modalities apart by such a gap (Liang et al., "Mind the Gap", 2022); a small CLIP trained
            from scratch does not (the Shapes CLIP's unmatched image-caption cosines are below zero). The offset
            leaves every ranking of images by one text, and of texts by one image, as it is: it divides every
            image-text cosine by ``sqrt(1 + c**2)``. The logit scale is multiplied by that factor when the
            backbone is built, and so is its clamp (``max_logit_scale``), so CLIP's own image-text logits, and
            every image-text loss at CLIP's temperature, do not change either. What changes is how much a text
            moves a sum with an image embedding (by ``1 / sqrt(1 + c**2)``), text-text cosines (pulled towards 1:
            a softmax over them at CLIP's temperature sees them scaled by ``1 / sqrt(1 + c**2)``) and image-image
            logits at CLIP's temperature (sharper by ``sqrt(1 + c**2)``). ``model.logit_scale`` is raised in place.
    """

    has_image_tokens = True

    def __init__(
        self, model: Any, tokenizer: Any, transform: ImageTransform, name: str = "hf-clip", modality_gap: float = 0.0
    ) -> None:
        super().__init__()
        if not math.isfinite(modality_gap) or modality_gap < 0:
            raise ValueError(f"modality_gap must be a finite number >= 0, got {modality_gap}")
        self.modality_gap = float(modality_gap)
        if self.modality_gap:
            with torch.no_grad():
                model.logit_scale.add_(math.log(math.hypot(1.0, self.modality_gap)))
        self.model = model
        self.tokenizer = tokenizer
        self.image_transform = transform
        self.name = name
        self.placeholder_token_id = placeholder_token_id(tokenizer)
        text_cfg = model.config.text_config
        self.context_length = int(min(text_cfg.max_position_embeddings, tokenizer.model_max_length))
        self._fingerprint: str | None = None

    # -- dimensions -------------------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """Dimension of the joint (projected) embedding space (one more with a modality gap)."""
        return int(self.model.config.projection_dim) + (1 if self.modality_gap else 0)

    @property
    def token_dim(self) -> int:
        """Width of the text encoder's input token embeddings (where pseudo-words live)."""
        return int(self.model.config.text_config.hidden_size)

    @property
    def vision_width(self) -> int:
        """Width of the image encoder's token states."""
        return int(self.model.config.vision_config.hidden_size)

    @property
    def logit_scale(self) -> nn.Parameter:
        """CLIP's learnable log inverse temperature."""
        return self.model.logit_scale

    @property
    def max_logit_scale(self) -> float:
        """CLIP's clamp on ``exp(logit_scale)`` (100), raised with the scale by a modality gap."""
        return 100.0 * math.hypot(1.0, self.modality_gap)

    @property
    def device(self) -> torch.device:
        """Where inputs go."""
        return self.model.logit_scale.device

    def image_encoder_parameters(self) -> Iterator[nn.Parameter]:
        """The vision tower's and its projection's parameters (what cached image features depend on)."""
        yield from self.model.vision_model.parameters()
        yield from self.model.visual_projection.parameters()

    # -- text ---------------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> TokenBatch:
        """Tokenises ``texts`` (padded to the longest, truncated to the context length keeping the end token)."""
        enc = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        device = self.model.logit_scale.device
        return TokenBatch(enc["input_ids"].to(device), enc["attention_mask"].to(device))

    def truncate(self, texts: list[str]) -> list[str]:
        """``texts`` cut to the tokens the context holds (what ``encode_text`` reads of them), decoded back to text;
        texts that fit are returned unchanged."""
        keep = self.context_length - 2  # the start and end tokens take two places
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [
            t if len(i) <= keep else self.tokenizer.decode(i[:keep]).strip() for t, i in zip(texts, ids, strict=True)
        ]

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids, (B, L) -> (B, L, token_dim)."""
        return self.model.text_model.embeddings.token_embedding(input_ids)

    def _pool_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Same rule as transformers' CLIPTextModel: old configs (eos id 2) pool at the highest id, others at the
        # first end-of-text token.
        eos = self.model.text_model.eos_token_id
        if eos == 2:
            return input_ids.to(torch.int).argmax(dim=-1)
        return (input_ids.to(torch.int) == eos).int().argmax(dim=-1)

    def encode_text_embeds(self, input_embeds: torch.Tensor, tokens: TokenBatch) -> TextFeatures:
        """Runs the text tower from input token embeddings (e.g. with pseudo-words spliced in).

        Args:
            input_embeds: (B, L, token_dim) input embeddings, position embeddings not yet added.
            tokens: the token ids (used for pooling at the end token) and attention mask.
        """
        from transformers.masking_utils import create_causal_mask

        tm = self.model.text_model
        hidden = tm.embeddings(inputs_embeds=input_embeds)  # (B, L, w_t) with positions
        mask = create_causal_mask(
            config=tm.config,
            inputs_embeds=hidden,
            attention_mask=tokens.attention_mask,
            **_no_cache(create_causal_mask),
        )
        states = tm.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        states = tm.final_layer_norm(states)  # (B, L, w_t)
        pooled = states[torch.arange(states.shape[0], device=states.device), self._pool_positions(tokens.input_ids)]
        embeds = self.model.text_projection(pooled)  # (B, projection_dim)
        if self.modality_gap:  # scaled by the norm, so the offset is c once the embedding is normalised
            embeds = torch.cat([embeds, self.modality_gap * embeds.norm(dim=-1, keepdim=True)], dim=-1)
        return TextFeatures(embeds, states, tokens.attention_mask)

    def encode_text(self, tokens: TokenBatch | list[str]) -> TextFeatures:
        """Encodes tokenised texts (or raw strings) into projected embeddings (B, embed_dim) and token states."""
        if not isinstance(tokens, TokenBatch):
            tokens = self.tokenize(tokens)
        return self.encode_text_embeds(self.token_embeddings(tokens.input_ids), tokens)

    # -- images -------------------------------------------------------------------------------------------------
    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> normalised pixels (B, 3, S, S) on the backbone's device."""
        return self.image_transform(images).to(self.model.logit_scale.device)

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        """Encodes pixels (B, 3, S, S) into projected embeddings (B, embed_dim) and token states (B, 1+n, w_v)."""
        vm = self.model.vision_model
        states = vm(pixel_values=pixels.to(self.model.logit_scale.dtype)).last_hidden_state  # (B, 1+n, w_v)
        # post_layernorm is per-token, so applying it to all tokens keeps the CLS path identical to CLIP's pooling.
        tokens = vm.post_layernorm(states)
        embeds = self.model.visual_projection(tokens[:, 0])  # (B, projection_dim)
        if self.modality_gap:
            embeds = torch.cat([embeds, embeds.new_zeros(len(embeds), 1)], dim=-1)
        return ImageFeatures(embeds, tokens)

    # -- state ---------------------------------------------------------------------------------------------------
    def freeze(self) -> HFCLIPBackbone:
        """Turns off gradients for every parameter and switches to eval mode; returns self."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def identity(self) -> str:
        """Identity of the image path (weights + preprocessing) for feature-cache keys.

        A hash of the vision tower's parameters, computed once; methods that fine-tune the image encoder must not
        use cached features.
        """
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=12)
            for key, tensor in sorted(self.model.vision_model.state_dict().items()):
                h.update(key.encode())
                h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            h.update(self.model.visual_projection.weight.detach().cpu().float().numpy().tobytes())
            # What the features depend on, however the spec spelled it: the weights, the gap (the image embeddings
            # grow a dimension) and, below, the preprocessing; the spec's options are named by the last two.
            gap = f"+gap{self.modality_gap!r}" if self.modality_gap else ""
            self._fingerprint = f"{self.name.partition('#')[0]}@{h.hexdigest()}{gap}"
        return f"{self._fingerprint}/{self.image_transform.identity()}"

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes ``config.json``, ``model.safetensors``, tokenizer files and ``preprocessor_config.json``.

        The directory is written beside its destination and renamed into place, so a crash leaves no half-written
        model; it loads with ``hf-clip:<path>`` and with ``transformers.CLIPModel.from_pretrained``. The checkpoint is
        written without the modality gap (its logit scale as before the gap raised it); pass ``modality_gap`` again
        when loading it.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = create_temp_dir(path.parent, f".{path.name}.")
        lift = math.log(math.hypot(1.0, self.modality_gap))
        try:
            with _local_bars_off(True), torch.no_grad():
                self.model.logit_scale.sub_(lift)
                try:
                    self.model.save_pretrained(tmp, safe_serialization=True)
                finally:
                    self.model.logit_scale.add_(lift)
                self.tokenizer.save_pretrained(tmp)
            (tmp / PREPROCESSOR_FILE).write_text(json.dumps(self.image_transform.to_hf_config(), indent=2))
            replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, dtype: torch.dtype | None = None, modality_gap: float = 0.0, **hub_kwargs: Any
    ) -> HFCLIPBackbone:
        """Loads from a local directory or a Hugging Face hub id (``openai/clip-vit-large-patch14``).

        Args:
            name_or_path: local directory or hub id.
            dtype: parameter dtype (default float32).
            modality_gap: see the class; 0 keeps the checkpoint's joint space.
            hub_kwargs: passed to transformers' ``from_pretrained`` (e.g. ``revision``, ``local_files_only``).
        """
        from transformers import AutoTokenizer, CLIPModel
        from transformers.image_processing_base import ImageProcessingMixin

        local = Path(name_or_path)
        if local.exists() and not local.is_dir():
            raise ValueError(f"{name_or_path}: expected a model directory, found a file")
        if local.is_dir() and not (local / "config.json").is_file():
            raise FileNotFoundError(f"{name_or_path}: not a model directory (no config.json)")
        try:
            with _local_bars_off(local.is_dir()):
                model = CLIPModel.from_pretrained(name_or_path, dtype=dtype or torch.float32, **hub_kwargs)
                tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
        except OSError as err:
            raise OSError(f"cannot load CLIP weights from {name_or_path!r}: {err}") from err
        try:
            # Only the settings are read (no processor is built), so no torchvision-backed class is involved.
            proc, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path, **hub_kwargs)
        except OSError:
            proc = {}
        transform = ImageTransform.from_hf_config(proc, default_size=model.config.vision_config.image_size)
        name = gap_spec(f"hf-clip:{name_or_path}", float(modality_gap))
        return cls(model.eval(), tokenizer, transform, name=name, modality_gap=modality_gap)


@BACKBONES.register("hf-clip")
def hf_clip(weights: str = "openai/clip-vit-large-patch14", **kwargs: Any) -> HFCLIPBackbone:
    """Hugging Face CLIP from a hub id or a local directory: ``hf-clip:openai/clip-vit-large-patch14``."""
    return HFCLIPBackbone.from_pretrained(weights, **kwargs)


def gap_spec(spec: str, modality_gap: float) -> str:
    """``spec`` with the modality gap as an option (``...#gap=C``), so that a checkpoint's recorded backbone name
    rebuilds it; unchanged without a gap."""
    if not modality_gap:
        return spec
    return f"{spec}{'&' if '#' in spec else '#'}gap={float(modality_gap)!r}"

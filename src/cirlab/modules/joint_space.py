"""Joint vision-language spaces: one L2-normalised vector ``z`` for an image, a text, or an (image, text) pair.

``JointSpace`` is the protocol ``embed(image=None, text=None) -> z`` (B, dim). Two implementations:

- ``CLIPJointSpace``: a dual encoder's space, ``z(I) = v``, ``z(T) = t``, ``z(I, T) = norm(v + t)`` (unit ``v``,
  ``t``). It reads cached image features (``ImageFeatures`` or raw embeddings), so training never re-encodes
  images, and keeps the (frozen) text tower's embeddings in memory per distinct string.
- ``MLLMJointSpace``: a multimodal LLM through transformers. Image, text and pair are each wrapped in a prompt
  (E5-V style: "... in one word:") inside the model's chat format; ``z`` is the final hidden state of the last
  token, L2-normalised. Supported families: Qwen2-VL and Qwen2.5-VL (``model_type`` ``qwen2_vl``,
  ``qwen2_5_vl``), e.g. ``Qwen/Qwen2.5-VL-72B-Instruct``; tested offline with a tiny random Qwen2.5-VL config.
  Images are preprocessed by the family's PIL image processor (``backend="pil"``): the default fast processors
  need torchvision, which cirlab does not require.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from cirlab.types import ImageFeatures

if TYPE_CHECKING:
    from PIL import Image


@runtime_checkable
class JointSpace(Protocol):
    """A space where images, texts and (image, text) pairs share one L2-normalised embedding of size ``dim``."""

    dim: int

    def embed(self, image: Any = None, text: Any = None) -> torch.Tensor:
        """``z(image)``, ``z(text)`` or ``z(image, text)``, (B, dim), L2-normalised."""
        ...


class CLIPJointSpace:
    """The joint space of a CLIP-like dual encoder: ``z(I) = v``, ``z(T) = t``, ``z(I, T) = norm(v + t)``.

    Text embeddings can be served from an in-memory cache (``cached=True``; for training, where the same captions
    and modification texts come back every epoch). Not an ``nn.Module``: it only borrows the backbone (which its
    owner registers), so the backbone's tensors are never saved twice.

    Args:
        backbone: a frozen backbone with ``encode_text``/``tokenize`` and ``embed_dim``.
        cache_size: how many distinct strings' text embeddings are kept in memory (0 disables the cache); the text
            tower is frozen, so a cached embedding stays valid.
    """

    def __init__(self, backbone: Any, cache_size: int = 100_000) -> None:
        self.backbone = backbone
        self.dim = int(backbone.embed_dim)
        self.cache_size = cache_size
        self._cache: dict[str, torch.Tensor] = {}

    def image_embeds(self, image: ImageFeatures | torch.Tensor) -> torch.Tensor:
        """``z(I) = norm(v)`` (B, dim) from image features or raw image embeddings (B, dim)."""
        embeds = image.embeds if isinstance(image, ImageFeatures) else image
        return F.normalize(embeds.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str] | torch.Tensor, cached: bool = False) -> torch.Tensor:
        """``z(T) = norm(t)`` (B, dim) from strings or raw text embeddings.

        Args:
            texts: strings, or text embeddings (B, dim).
            cached: serve strings from (and add them to) the cache, encoding each distinct string once.
        """
        if isinstance(texts, torch.Tensor):
            return F.normalize(texts.float(), dim=-1)
        texts = list(texts)
        if not cached:
            return F.normalize(self.backbone.encode_text(self.backbone.tokenize(texts)).embeds.float(), dim=-1)
        missing = [s for s in dict.fromkeys(texts) if s not in self._cache]
        if missing:
            tokens = self.backbone.tokenize(missing)
            fresh = F.normalize(self.backbone.encode_text(tokens).embeds.float(), dim=-1)  # (M, dim)
            if len(self._cache) + len(missing) > self.cache_size:
                # Not room for all: encode this batch without caching it (no eviction bookkeeping needed).
                lookup = dict(zip(missing, fresh, strict=True))
                return torch.stack([self._cache[s] if s in self._cache else lookup[s] for s in texts])
            self._cache.update(zip(missing, fresh, strict=True))
        return torch.stack([self._cache[s] for s in texts])

    def embed(
        self,
        image: ImageFeatures | torch.Tensor | None = None,
        text: Sequence[str] | torch.Tensor | None = None,
        cached: bool = False,
    ) -> torch.Tensor:
        """``z(I)``, ``z(T)`` or ``z(I, T) = norm(z(I) + z(T))``, (B, dim), L2-normalised.

        Args:
            image: image features or image embeddings (B, dim).
            text: strings or text embeddings (B, dim).
            cached: serve strings' embeddings from the in-memory cache (see ``text_embeds``).
        """
        if image is None and text is None:
            raise ValueError("embed needs an image, a text or both")
        if text is None:
            return self.image_embeds(image)
        if image is None:
            return self.text_embeds(text, cached)
        return F.normalize(self.image_embeds(image) + self.text_embeds(text, cached), dim=-1)


@dataclass
class MLLMJointSpaceConfig:
    """Settings of a multimodal-LLM joint space.

    Attributes:
        model_id: hub id or local directory of a Qwen2-VL / Qwen2.5-VL checkpoint.
        image_prompt: user message for an image (``<image>`` marks where the image goes).
        text_prompt: user message for a text (``{text}``).
        pair_prompt: user message for an (image, modification text) pair.
        chat_format: the chat wrapping of a user message (``{content}``); Qwen's by default.
        image_marker: the marker replaced by the image's tokens.
        dtype: model dtype (``bfloat16``, ``float16``, ``float32``).
        min_pixels: smallest image area after resizing (None: the processor's setting).
        max_pixels: largest image area after resizing (None: the processor's setting); bounds image tokens.
        batch_size: inputs per forward pass.
        device_map: passed to ``from_pretrained`` (e.g. ``auto`` to shard a 72B model; needs accelerate).
    """

    model_id: str = "Qwen/Qwen2.5-VL-72B-Instruct"
    image_prompt: str = "<image>\nSummarize above image in one word:"
    text_prompt: str = "{text}\nSummarize above sentence in one word:"
    pair_prompt: str = '<image>\nModify this image with "{text}". Describe the modified image in one word:'
    chat_format: str = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    image_marker: str = "<image>"
    dtype: str = "bfloat16"
    min_pixels: int | None = None
    max_pixels: int | None = 448 * 448
    batch_size: int = 8
    device_map: str | None = None


SUPPORTED_MLLMS = ("qwen2_vl", "qwen2_5_vl")


class MLLMJointSpace:
    """A multimodal LLM's joint space: the L2-normalised final hidden state of a prompt's last token.

    Args:
        model: the base model (``transformers.AutoModel`` of a supported family, without the LM head).
        tokenizer: its tokenizer.
        image_processor: its (PIL-backend) image processor.
        config: prompts and settings.
    """

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, config: MLLMJointSpaceConfig) -> None:
        model_type = getattr(model.config, "model_type", "")
        if model_type not in SUPPORTED_MLLMS:
            raise ValueError(f"unsupported multimodal LLM {model_type!r}; supported: {', '.join(SUPPORTED_MLLMS)}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        text_config = model.config.get_text_config()
        self.dim = int(text_config.hidden_size)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Qwen2-VL's processors read the pixel bounds as size = {shortest_edge: min area, longest_edge: max area}.
        size = image_processor.size
        self.image_size = {
            "shortest_edge": config.min_pixels if config.min_pixels is not None else size.shortest_edge,
            "longest_edge": config.max_pixels if config.max_pixels is not None else size.longest_edge,
        }

    @classmethod
    def from_pretrained(cls, config: MLLMJointSpaceConfig | str, **hub_kwargs: Any) -> MLLMJointSpace:
        """Loads model, tokenizer and PIL image processor from a hub id or a local directory.

        Args:
            config: the settings, or just a model id / directory.
            hub_kwargs: passed to every ``from_pretrained`` (e.g. ``revision``, ``local_files_only``).
        """
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        if isinstance(config, str):
            config = MLLMJointSpaceConfig(model_id=config)
        model_kwargs = dict(hub_kwargs, dtype=getattr(torch, config.dtype))
        if config.device_map is not None:
            model_kwargs["device_map"] = config.device_map
        try:
            # AutoModel gives the base model (no LM head): only hidden states are needed.
            model = AutoModel.from_pretrained(config.model_id, **model_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(config.model_id, **hub_kwargs)
            processor = AutoImageProcessor.from_pretrained(config.model_id, backend="pil", **hub_kwargs)
        except OSError as err:
            raise OSError(f"cannot load the multimodal LLM {config.model_id!r}: {err}") from err
        return cls(model, tokenizer, processor, config)

    @property
    def device(self) -> torch.device:
        """Where the model's input embeddings live (inputs go there)."""
        return self.model.get_input_embeddings().weight.device

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompt_ids(self, prompt: str, text: str | None, image_tokens: int | None) -> list[int]:
        """Token ids of one chat-wrapped prompt, the image marker replaced by the image's token block."""
        content = prompt.replace("{text}", text) if text is not None else prompt
        full = self.config.chat_format.replace("{content}", content)
        pieces = full.split(self.config.image_marker)
        if (len(pieces) > 1) != (image_tokens is not None):
            raise ValueError(f"prompt {prompt!r} must hold {self.config.image_marker!r} exactly when there is an image")
        ids = self._ids(pieces[0])
        for piece in pieces[1:]:
            c = self.model.config
            ids += [c.vision_start_token_id, *([c.image_token_id] * image_tokens), c.vision_end_token_id]
            ids += self._ids(piece)
        return ids

    @torch.no_grad()
    def _forward(self, sequences: list[list[int]], images: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Last-token final hidden states (B, dim), L2-normalised, of right-padded sequences."""
        lengths = torch.tensor([len(s) for s in sequences])
        width = int(lengths.max())
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros(len(sequences), width, dtype=torch.long)  # (B, L)
        for i, seq in enumerate(sequences):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        kwargs = {k: v.to(self.device) for k, v in (images or {}).items()}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model.dtype)
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        states = out.last_hidden_state  # (B, L, dim)
        # Right padding: the last real token sits at length - 1 and, attention being causal, never sees the pads.
        last = states[torch.arange(len(sequences)), (lengths - 1).to(states.device)]  # (B, dim)
        return F.normalize(last.float(), dim=-1)

    def embed(self, image: Sequence[Image.Image] | None = None, text: Sequence[str] | None = None) -> torch.Tensor:
        """``z(I)``, ``z(T)`` or ``z(I, T)`` (B, dim), L2-normalised, from PIL images and/or strings."""
        if image is None and text is None:
            raise ValueError("embed needs an image, a text or both")
        if image is not None and text is not None and len(image) != len(text):
            raise ValueError(f"{len(image)} images but {len(text)} texts")
        n = len(image) if image is not None else len(text)
        prompt = self.config.pair_prompt if image is not None and text is not None else None
        prompt = prompt or (self.config.image_prompt if image is not None else self.config.text_prompt)
        merge = int(getattr(self.image_processor, "merge_size", 1))
        out = []
        for start in range(0, n, self.config.batch_size):
            stop = min(n, start + self.config.batch_size)
            images, counts = None, [None] * (stop - start)
            if image is not None:
                rgb = [im.convert("RGB") for im in image[start:stop]]
                images = dict(self.image_processor(images=rgb, size=self.image_size, return_tensors="pt"))
                # Qwen2-VL merges merge x merge patches into one LLM token: grid t*h*w / merge^2 tokens per image.
                counts = [int(g.prod()) // merge**2 for g in images["image_grid_thw"]]
            chunk_text = list(text[start:stop]) if text is not None else [None] * (stop - start)
            sequences = [self._prompt_ids(prompt, s, c) for s, c in zip(chunk_text, counts, strict=True)]
            out.append(self._forward(sequences, images))
        return torch.cat(out)

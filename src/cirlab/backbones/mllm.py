"""Multimodal-LLM backbone (``mllm``): a Qwen2-VL / Qwen2.5-VL checkpoint through transformers, as a joint space.

Image, text and (image, text) pair are each wrapped in a prompt (E5-V style: "... in one word:") inside the
model's chat format; the embedding is the final hidden state of the prompt's last token, L2-normalised. Supported
families: Qwen2-VL and Qwen2.5-VL (``model_type`` ``qwen2_vl``, ``qwen2_5_vl``), e.g.
``mllm:Qwen/Qwen2.5-VL-72B-Instruct`` (the default) or ``mllm:path/to/dir``.

Two ways in:

- ``MLLMJointSpace``: PIL images and strings in, ``z`` out; images keep their aspect ratio (the family's PIL image
  processor, ``backend="pil"``: the default fast processors need torchvision, which cirlab does not require).
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.backbones.hf_clip import _placeholder_id
from cirlab.backbones.transforms import ImageTransform
from cirlab.registry import BACKBONES
from cirlab.types import ImageFeatures, TextFeatures, TokenBatch

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_MLLM = "Qwen/Qwen2.5-VL-72B-Instruct"
SUPPORTED_MLLMS = ("qwen2_vl", "qwen2_5_vl")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


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
        min_pixels: smallest image area after resizing, PIL path (None: the processor's setting).
        max_pixels: largest image area after resizing, PIL path (None: the processor's setting); bounds image tokens.
        image_size: side of the square images the backbone path feeds the model (a multiple of patch x merge size;
            448 gives 256 image tokens with Qwen's 14 px patches merged 2 x 2).
        batch_size: inputs per forward pass.
        device_map: passed to ``from_pretrained`` (e.g. ``auto`` to shard a 72B model; needs accelerate).
    """

    model_id: str = DEFAULT_MLLM
    image_prompt: str = "<image>\nSummarize above image in one word:"
    text_prompt: str = "{text}\nSummarize above sentence in one word:"
    pair_prompt: str = '<image>\nModify this image with "{text}". Describe the modified image in one word:'
    chat_format: str = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    image_marker: str = "<image>"
    dtype: str = "bfloat16"
    min_pixels: int | None = None
    max_pixels: int | None = 448 * 448
    image_size: int = 448
    batch_size: int = 8
    device_map: str | None = None


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

    def prompt(self, image: bool, text: bool) -> str:
        """The user message for an image, a text or a pair."""
        if image and text:
            return self.config.pair_prompt
        return self.config.image_prompt if image else self.config.text_prompt

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: str, text: str | None, image_tokens: int | None) -> list[int]:
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

    def pad(self, sequences: list[list[int]]) -> TokenBatch:
        """Right-padded ids and mask (B, L) on the model's device."""
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros(len(sequences), width, dtype=torch.long)  # (B, L)
        for i, seq in enumerate(sequences):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        return TokenBatch(input_ids, mask).to(self.device)

    def hidden_states(
        self,
        tokens: TokenBatch,
        images: dict[str, torch.Tensor] | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states (B, L, dim) of right-padded prompts, and their last tokens' (B, dim), L2-normalised.

        Args:
            tokens: right-padded prompt ids and mask.
            images: ``pixel_values`` and ``image_grid_thw`` of the images whose token blocks the prompts hold.
            inputs_embeds: input embeddings (B, L, dim) to use instead of the ids' own (e.g. pseudo-words spliced
                in); the ids still locate the image tokens.
        """
        kwargs = {k: v.to(self.device) for k, v in (images or {}).items()}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model.dtype)
        out = self.model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )
        states = out.last_hidden_state  # (B, L, dim)
        # Right padding: the last real token sits at length - 1 and, attention being causal, never sees the pads.
        last = tokens.attention_mask.sum(dim=1).to(states.device) - 1  # (B,)
        z = states[torch.arange(states.shape[0], device=states.device), last]  # (B, dim)
        return states, F.normalize(z.float(), dim=-1)

    def embed_inputs(self, images: dict[str, torch.Tensor] | None, texts: Sequence[str] | None) -> torch.Tensor:
        """``z`` (B, dim) of one batch: processed images (``pixel_values``, ``image_grid_thw``) and/or strings."""
        merge = int(getattr(self.image_processor, "merge_size", 1))
        n = len(images["image_grid_thw"]) if images is not None else len(texts)
        # Qwen2-VL merges merge x merge patches into one LLM token: grid t*h*w / merge^2 tokens per image.
        counts = [int(g.prod()) // merge**2 for g in images["image_grid_thw"]] if images is not None else [None] * n
        chunk_text = list(texts) if texts is not None else [None] * n
        prompt = self.prompt(images is not None, texts is not None)
        sequences = [self.prompt_ids(prompt, s, c) for s, c in zip(chunk_text, counts, strict=True)]
        return self.hidden_states(self.pad(sequences), images)[1]

    @torch.no_grad()
    def embed(self, image: Sequence[Image.Image] | None = None, text: Sequence[str] | None = None) -> torch.Tensor:
        """``z(I)``, ``z(T)`` or ``z(I, T)`` (B, dim), L2-normalised, from PIL images and/or strings."""
        if image is None and text is None:
            raise ValueError("embed needs an image, a text or both")
        if image is not None and text is not None and len(image) != len(text):
            raise ValueError(f"{len(image)} images but {len(text)} texts")
        n = len(image) if image is not None else len(text)
        out = []
        for start in range(0, n, self.config.batch_size):
            stop = min(n, start + self.config.batch_size)
            images = None
            if image is not None:
                rgb = [im.convert("RGB") for im in image[start:stop]]
                images = dict(self.image_processor(images=rgb, size=self.image_size, return_tensors="pt"))
            out.append(self.embed_inputs(images, text[start:stop] if text is not None else None))
        return torch.cat(out)


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
        return _placeholder_id(self.tokenizer)

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

    from cirlab.backbones.tokenizer import BASIC_CORPUS, train_bpe_tokenizer

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

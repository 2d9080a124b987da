"""A multimodal LLM's joint space (Qwen2-VL / Qwen2.5-VL through transformers): PIL images and strings in, ``z`` out.

Image, text and (image, text) pair are each wrapped in a prompt (E5-V style: "... in one word:") inside the
model's chat format; the embedding is the final hidden state of the prompt's last token, L2-normalised. Supported
families: Qwen2-VL and Qwen2.5-VL (``model_type`` ``qwen2_vl``, ``qwen2_5_vl``). Images keep their aspect ratio
(the family's PIL image processor, ``backend="pil"``: the default fast processors need torchvision, which cirlab
does not require). ``cirlab.backbones.mllm`` puts this space behind the backbone protocol; the captioners of
``cirlab.generation`` reuse its chat wrapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from cirlab.types import TokenBatch

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

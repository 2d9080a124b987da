"""Text generators through transformers: captioners (``hf-captioner``, ``mllm``) and rewriters (``hf-rewriter``).

- ``hf-captioner:<hub id or dir>``: any image-to-text or image-text-to-text model ``AutoModelForImageTextToText``
  loads (BLIP-2, BLIP, LLaVA, Qwen2-VL, vision-encoder-decoder captioners). With a multimodal processor (BLIP-2,
  LLaVA, Qwen2-VL) the prompt goes through the processor, inside its chat template when it has one; a
  vision-encoder-decoder model without one reads the prompt as the start of its answer (its decoder prefix).
- ``mllm:<hub id or dir>``: a Qwen2-VL / Qwen2.5-VL checkpoint prompted exactly as the ``mllm`` backbone prompts it
  (``cirlab.backbones.mllm_space``: its chat wrapping, image marker and image sizes), with its language-model head, for
  OSrCIR's one-stage reasoning.
- ``hf-rewriter:<hub id or dir>``: any causal language model with a chat template (``AutoModelForCausalLM``).

A hub id may pin a revision, ``org/name@<commit>``. Models load on first use, so a run whose texts are all cached
never loads one; ``calls`` counts the model's ``generate`` calls. Sampled answers are drawn one request at a time
under a seed derived from the request's cache key, so an answer does not depend on what else was in the batch;
greedy and beam-search answers are computed in batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cirlab.generation.identity import split_revision, weights_identity
from cirlab.generation.sampling import Request, SamplingConfig
from cirlab.registry import CAPTIONERS, REWRITERS


@dataclass
class GeneratorOptions:
    """How a generating model is loaded and run (not what it answers, except ``dtype``, part of its identity).

    Attributes:
        dtype: weights dtype: ``auto`` (the checkpoint's), ``float32``, ``bfloat16``, ``float16``.
        device: where the model runs (``cpu``, ``cuda``, ``cuda:1``; empty: a method's backbone's device, else the
            CPU); ignored with ``device_map``.
        device_map: passed to ``from_pretrained`` (``auto`` shards a large model over the GPUs; needs accelerate).
        batch_size: requests per ``generate`` call (greedy and beam search).
    """

    dtype: str = "auto"
    device: str = ""
    device_map: str | None = None
    batch_size: int = 8


def _load_kwargs(options: GeneratorOptions, revision: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": options.dtype if options.dtype == "auto" else getattr(torch, options.dtype)}
    if options.device_map is not None:
        kwargs["device_map"] = options.device_map
    if revision is not None:
        kwargs["revision"] = revision
    return kwargs


def _cut(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string (the reference API calls end answers there)."""
    for s in stop:
        if s and s in text:
            text = text[: text.index(s)]
    return text.strip()


class TransformersGenerator:
    """Shared machinery: lazy loading, identity, seeding, batching, decoding.

    Args:
        weights: hub id (``org/name`` or ``org/name@revision``) or local directory.
        options: loading and batching.
        spec: the registry name the generator was made under (messages only).
    """

    kind = ""

    def __init__(self, weights: str, options: GeneratorOptions | None = None, spec: str = "") -> None:
        self.weights = weights
        self.name, self.revision = split_revision(weights)
        self.options = options or GeneratorOptions()
        self.spec = spec or weights
        self.calls = 0
        self.loads = 0
        self.model: Any = None
        self.tokenizer: Any = None
        self._identity: str | None = None

    def identity(self) -> str:
        """Weights identity and dtype (see ``cirlab.generation.identity``); computed once, without loading."""
        if self._identity is None:
            self._identity = f"{weights_identity(self.weights)}|{self.options.dtype}"
        return self._identity

    def _load(self) -> None:
        raise NotImplementedError

    def load(self) -> None:
        """Loads the model now (otherwise on the first request that is not cached)."""
        if self.model is None:
            try:
                self._load()
            except OSError as err:
                raise OSError(f"cannot load the {self.kind} {self.spec!r}: {err}") from err
            if self.options.device_map is None:
                self.model.to(self.options.device or "cpu")
            self.model.eval()
            self.loads += 1

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, requests: Sequence[Request], sampling: SamplingConfig, seeds: Sequence[int]) -> list[list[str]]:
        """Raw answers, ``sampling.num_return_sequences`` per request; ``seeds[i]`` seeds request i when sampling."""
        if not requests:
            return []
        self.load()
        if not sampling.do_sample:
            # Greedy and beam-search answers do not depend on the batch, so requests may be batched in any order:
            # one that groups similar requests (``_order``) wastes less on padding or on splitting batches.
            order = sorted(range(len(requests)), key=lambda i: self._order(requests[i]))
            step = max(1, self.options.batch_size)
            ordered = [requests[i] for i in order]
            answers = [
                out for s in range(0, len(ordered), step) for out in self._batch(ordered[s : s + step], sampling)
            ]
            out: list[list[str]] = [[] for _ in requests]
            for i, answer in zip(order, answers, strict=True):
                out[i] = answer
            return out
        out = []
        devices = [self.device] if self.device.type == "cuda" else []
        for request, seed in zip(requests, seeds, strict=True):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out += self._batch([request], sampling)
        return out

    def _batch(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[list[str]]:
        raise NotImplementedError

    def _order(self, request: Request) -> int:
        """Sort key of a request when batching (default: keep the given order)."""
        return 0

    def _generate(self, inputs: dict[str, Any], sampling: SamplingConfig, prefix: torch.Tensor | None) -> list[str]:
        """One ``generate`` call; returns the decoded answers (the prompt ``prefix`` removed when echoed)."""
        kwargs = sampling.generate_kwargs()
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        if self.tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        if self.tokenizer.eos_token_id is not None:
            kwargs["eos_token_id"] = self.tokenizer.eos_token_id
        self.calls += 1
        out = self.model.generate(**inputs, **kwargs)  # (B * n, L)
        if prefix is not None and out.shape[1] >= prefix.shape[1]:
            echoed = prefix.to(out.device).repeat_interleave(sampling.num_return_sequences, dim=0)
            if torch.equal(out[:, : prefix.shape[1]], echoed):
                out = out[:, prefix.shape[1] :]
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [_cut(t, sampling.stop) for t in texts]

    @staticmethod
    def _group(texts: list[str], n: int) -> list[list[str]]:
        return [texts[i : i + n] for i in range(0, len(texts), n)]


class HFRewriter(TransformersGenerator):
    """A causal language model with a chat template: chat messages in, answers out."""

    kind = "rewriter"

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"revision": self.revision} if self.revision else {}
        self.tokenizer = AutoTokenizer.from_pretrained(self.name, **kwargs)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.spec}: the tokenizer has no chat template; a rewriter needs a chat model")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.name, **_load_kwargs(self.options, self.revision))

    def _batch(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[list[str]]:
        if any(r.image is not None for r in requests):
            raise ValueError(f"{self.spec}: a rewriter reads text only")
        texts = [
            self.tokenizer.apply_chat_template(r.messages(), tokenize=False, add_generation_prompt=True)
            for r in requests
        ]
        # The chat template holds the special tokens already.
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        return self._group(self._generate(dict(enc), sampling, enc["input_ids"]), sampling.num_return_sequences)


class HFCaptioner(TransformersGenerator):
    """An image-to-text or image-text-to-text model: (image, prompt) in, answers out."""

    kind = "captioner"

    def _load(self) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
        from transformers.processing_utils import ProcessorMixin

        kwargs = {"revision": self.revision} if self.revision else {}
        processor = AutoProcessor.from_pretrained(self.name, **kwargs)
        if isinstance(processor, ProcessorMixin) and hasattr(processor, "image_processor"):
            self.processor = processor
            self.tokenizer = processor.tokenizer
            self.image_processor = None
        else:
            # A vision-encoder-decoder checkpoint has no multimodal processor: its parts load one by one.
            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(self.name, **kwargs)
            self.image_processor = AutoImageProcessor.from_pretrained(self.name, **kwargs)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(self.name, **_load_kwargs(self.options, self.revision))

    def _batch(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[list[str]]:
        if any(r.image is None for r in requests):
            raise ValueError(f"{self.spec}: every captioner request needs an image")
        images = [r.image.load() for r in requests]
        n = sampling.num_return_sequences
        if self.processor is not None:
            return self._group(self._with_processor(requests, images, sampling), n)
        return self._group(self._with_decoder_prefix(requests, images, sampling), n)

    def _order(self, request: Request) -> int:
        # A decoder prefix cannot be padded: batches of equal prompt lengths generate in one call each.
        if self.processor is not None:
            return 0
        return len(self.tokenizer("\n".join(p for p in (request.system, request.user) if p))["input_ids"])

    def _chat_template(self) -> str | None:
        return getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)

    def _with_processor(self, requests: Sequence[Request], images: list, sampling: SamplingConfig) -> list[str]:
        if self._chat_template():
            texts = []
            for r in requests:
                content = [{"type": "text", "text": r.user}] if r.user else []
                content.insert(0 if r.image_position == "before" else len(content), {"type": "image"})
                system = [{"role": "system", "content": [{"type": "text", "text": r.system}]}] if r.system else []
                conversation = [*system, {"role": "user", "content": content}]
                texts.append(
                    self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
                )
        else:
            texts = ["\n".join(p for p in (r.system, r.user) if p) for r in requests]
        if any(texts):
            inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs and self.model.dtype != torch.float32:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return self._generate(inputs, sampling, inputs.get("input_ids"))

    def _with_decoder_prefix(self, requests: Sequence[Request], images: list, sampling: SamplingConfig) -> list[str]:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(
            self.device, self.model.dtype
        )
        start = self.model.config.decoder_start_token_id
        prefixes = [
            [
                start,
                *self.tokenizer("\n".join(p for p in (r.system, r.user) if p), add_special_tokens=False)["input_ids"],
            ]
            for r in requests
        ]
        # Prompts of different lengths would need padding inside the decoder prefix: generate each length apart.
        out: list[str | None] = [None] * len(requests)
        for length in sorted({len(p) for p in prefixes}):
            rows = [i for i, p in enumerate(prefixes) if len(p) == length]
            prefix = torch.tensor([prefixes[i] for i in rows], device=self.device)  # (b, length)
            texts = self._generate({"pixel_values": pixels[rows], "decoder_input_ids": prefix}, sampling, prefix)
            n = sampling.num_return_sequences
            for j, i in enumerate(rows):
                out[i] = texts[j * n : (j + 1) * n]
        return [t for group in out for t in group]


class MLLMCaptioner(TransformersGenerator):
    """A Qwen2-VL / Qwen2.5-VL checkpoint with its language-model head, prompted as the ``mllm`` backbone prompts
    it (``MLLMJointSpaceConfig``'s chat wrapping, image marker and pixel bounds)."""

    kind = "captioner"

    def _load(self) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        from cirlab.backbones.mllm_space import MLLMJointSpace, MLLMJointSpaceConfig

        kwargs = {"revision": self.revision} if self.revision else {}
        self.tokenizer = AutoTokenizer.from_pretrained(self.name, **kwargs)
        processor = AutoImageProcessor.from_pretrained(self.name, backend="pil", **kwargs)
        self.model = AutoModelForImageTextToText.from_pretrained(self.name, **_load_kwargs(self.options, self.revision))
        self.space = MLLMJointSpace(self.model, self.tokenizer, processor, MLLMJointSpaceConfig(model_id=self.name))

    def _batch(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[list[str]]:
        if any(r.image is None for r in requests):
            raise ValueError(f"{self.spec}: every request needs an image")
        space, marker = self.space, self.space.config.image_marker
        processor = space.image_processor
        images = dict(processor(images=[r.image.load() for r in requests], size=space.image_size, return_tensors="pt"))
        merge = int(getattr(processor, "merge_size", 1))
        sequences = []
        for r, grid in zip(requests, images["image_grid_thw"], strict=True):
            user = f"{marker}\n{r.user}" if r.image_position == "before" else f"{r.user}\n{marker}"
            system = f"<|im_start|>system\n{r.system}<|im_end|>\n" if r.system else ""
            ids = self.tokenizer(system, add_special_tokens=False)["input_ids"] if system else []
            # Qwen2-VL merges merge x merge patches into one LLM token.
            sequences.append(ids + space.prompt_ids(user, None, int(grid.prod()) // merge**2))
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), space.pad_id, dtype=torch.long)  # (B, L), left-padded
        mask = torch.zeros(len(sequences), width, dtype=torch.long)  # (B, L)
        for i, seq in enumerate(sequences):
            input_ids[i, width - len(seq) :] = torch.tensor(seq)
            mask[i, width - len(seq) :] = 1
        inputs = {"input_ids": input_ids, "attention_mask": mask, **images}
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return self._group(self._generate(inputs, sampling, inputs["input_ids"]), sampling.num_return_sequences)


@CAPTIONERS.register("hf-captioner")
def hf_captioner(weights: str, options: GeneratorOptions | None = None) -> HFCaptioner:
    """``hf-captioner:<hub id or dir>``: an image-to-text / image-text-to-text transformers model."""
    return HFCaptioner(weights, options, spec=f"hf-captioner:{weights}")


@CAPTIONERS.register("mllm")
def mllm_captioner(weights: str, options: GeneratorOptions | None = None) -> MLLMCaptioner:
    """``mllm:<hub id or dir>``: a Qwen2-VL / Qwen2.5-VL model prompted like the ``mllm`` backbone."""
    return MLLMCaptioner(weights, options, spec=f"mllm:{weights}")


@REWRITERS.register("hf-rewriter")
def hf_rewriter(weights: str, options: GeneratorOptions | None = None) -> HFRewriter:
    """``hf-rewriter:<hub id or dir>``: a causal language model with a chat template."""
    return HFRewriter(weights, options, spec=f"hf-rewriter:{weights}")

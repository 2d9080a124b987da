"""What a text generator is asked: sampling settings and requests, and the key under which the answer is cached."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cirlab.types import ReferenceImage


@dataclass
class SamplingConfig:
    """How a generator decodes (transformers ``generate`` settings).

    Attributes:
        num_beams: beams of beam search (1: greedy or plain sampling).
        do_sample: sample instead of searching; ``temperature`` and ``top_p`` apply only then.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        num_return_sequences: texts returned per request (several captions of one image, for LDRE); at most
            ``num_beams`` when searching.
        max_new_tokens: longest answer.
        stop: strings that end an answer early (e.g. a blank line, as the reference API calls ask).
    """

    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.num_return_sequences < 1 or self.max_new_tokens < 1:
            raise ValueError("num_beams, num_return_sequences and max_new_tokens must be at least 1")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences ({self.num_return_sequences}) must not exceed num_beams ({self.num_beams}) "
                "without sampling: a search returns at most one text per beam"
            )
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")

    def effective(self, seed: int) -> dict[str, Any]:
        """The settings that determine the output: temperature, top-p and the seed only count when sampling, so a
        greedy or beam-search answer is shared by every seed."""
        out: dict[str, Any] = {
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
            "num_return_sequences": self.num_return_sequences,
            "max_new_tokens": self.max_new_tokens,
            "stop": list(self.stop),
        }
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p, seed=seed)
        return out

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``transformers`` ``generate`` (without ``stop``, which needs the tokenizer)."""
        kwargs: dict[str, Any] = {
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
            "num_return_sequences": self.num_return_sequences,
            "max_new_tokens": self.max_new_tokens,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


@dataclass(frozen=True)
class Request:
    """One generation: a chat-style prompt, optionally about an image.

    Attributes:
        user: the user message (text).
        system: the system message ("" for none).
        image: the image the request is about (captioners and one-stage models), or None.
        image_position: where the image sits in the user message: ``before`` or ``after`` the text.
    """

    user: str
    system: str = ""
    image: ReferenceImage | None = field(default=None, compare=False)
    image_position: str = "before"

    def __post_init__(self) -> None:
        if self.image_position not in ("before", "after"):
            raise ValueError(f"image_position must be 'before' or 'after', got {self.image_position!r}")

    def messages(self) -> list[dict[str, str]]:
        """The prompt as chat messages (text only; the image's place is ``image_position``)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self.user}]

    def key(self, model: str, sampling: dict[str, Any]) -> str:
        """The cache key: a digest of the model identity, the prompt, the image digest and the effective sampling
        settings (seed included when sampling)."""
        payload = {
            "model": model,
            "messages": self.messages(),
            "image": self.image.digest if self.image is not None else None,
            "image_position": self.image_position if self.image is not None else None,
            "sampling": sampling,
        }
        return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=16).hexdigest()

"""Cached generation: every request's answer is looked up in a ``TextCache`` first; only misses reach the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from cirlab.generation.cache import TextCache
from cirlab.generation.hf import GeneratorOptions
from cirlab.generation.sampling import Request, SamplingConfig
from cirlab.registry import CAPTIONERS, REWRITERS

ROLES = {"captioner": CAPTIONERS, "reasoner": CAPTIONERS, "rewriter": REWRITERS}
"""A method's generator roles and the registry each one's spec names: captioners describe images, one-stage
reasoners are image-text-to-text models too, rewriters read text only."""


class Generator(Protocol):
    """A text generator as the cache sees it (``cirlab.generation.hf``)."""

    calls: int

    def identity(self) -> str:
        """What determines its answers, computable without loading it."""
        ...

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig, seeds: Sequence[int]) -> list[list[str]]:
        """``sampling.num_return_sequences`` raw answers per request."""
        ...


def create_generator(spec: str, role: str, options: GeneratorOptions | None = None) -> Any:
    """The generator named by ``spec`` (``hf-captioner:<id or dir>``, ``mllm:<id or dir>``, ``hf-rewriter:...``).

    Raises:
        ValueError: an unknown role, or a spec without weights.
        KeyError: an unknown generator name (listing the registered ones).
    """
    if role not in ROLES:
        raise ValueError(f"unknown generator role {role!r}; roles: {', '.join(ROLES)}")
    name, sep, weights = spec.partition(":")
    factory = ROLES[role].get(name)
    if not sep or not weights:
        raise ValueError(f"generator spec {spec!r} names no model; write {name}:<hub id or directory>")
    return factory(weights, options)


def generate_cached(
    generator: Generator,
    requests: Sequence[Request],
    sampling: SamplingConfig,
    seed: int,
    cache: TextCache,
    kind: str,
) -> list[list[str]]:
    """Raw answers of ``requests`` (``num_return_sequences`` each), from ``cache`` where it has them.

    The misses (each distinct key once) go to the model in one call, are added to the cache and flushed.

    Args:
        generator: the model.
        requests: the prompts (and images).
        sampling: decoding settings.
        seed: the sampling seed (each request is sampled under a seed derived from it and the request's key).
        cache: where answers are looked up and added.
        kind: what the answers are (``caption``, ``rewrite``, ``describe``), recorded for readers of the cache.
    """
    model = generator.identity()
    effective = sampling.effective(seed)
    keys = [r.key(model, effective) for r in requests]
    todo: dict[str, Request] = {}
    for key, request in zip(keys, requests, strict=True):
        if cache.get(key) is None and key not in todo:
            todo[key] = request
    if todo:
        # A request's sampling seed follows from its key (which holds the seed when sampling).
        seeds = [int(key[:15], 16) for key in todo]
        answers = generator.generate(list(todo.values()), sampling, seeds)
        for (key, request), outputs in zip(todo.items(), answers, strict=True):
            if len(outputs) != sampling.num_return_sequences:
                raise RuntimeError(f"{kind}: expected {sampling.num_return_sequences} answers, got {len(outputs)}")
            cache.put(
                {
                    "key": key,
                    "model": model,
                    "kind": kind,
                    "messages": request.messages(),
                    "image": request.image.digest if request.image is not None else None,
                    "image_position": request.image_position if request.image is not None else None,
                    "sampling": effective,
                    "outputs": list(outputs),
                }
            )
        cache.flush()
    return [list(cache.get(k)["outputs"]) for k in keys]


class GeneratorSet:
    """A method's generators, made from their specs when first asked for and kept (a model loads on the first
    request its cache lacks); a changed spec or option makes a new one."""

    def __init__(self) -> None:
        self._made: dict[tuple[str, str, str], Any] = {}

    def get(self, spec: str, role: str, options: GeneratorOptions) -> Any:
        key = (spec, role, repr(options))
        if key not in self._made:
            self._made[key] = create_generator(spec, role, options)
        return self._made[key]

    def __iter__(self):
        return iter(self._made.values())

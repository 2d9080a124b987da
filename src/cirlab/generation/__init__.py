"""Text generation for the training-free generative methods (CIReVL, LDRE, OSrCIR): captioners, rewriters and
one-stage reasoners behind small protocols, registered by name (``CAPTIONERS``, ``REWRITERS``), their prompts,
and the cache that records every generated text with everything that determined it."""

from cirlab.generation import hf  # noqa: F401  (registration)
from cirlab.generation.cache import TextCache, default_generation_cache
from cirlab.generation.cached import GeneratorSet, create_generator, generate_cached
from cirlab.generation.hf import GeneratorOptions
from cirlab.generation.prompts import PROMPTS, Prompt, resolve_prompt
from cirlab.generation.sampling import Request, SamplingConfig
from cirlab.registry import CAPTIONERS, REWRITERS

__all__ = [
    "CAPTIONERS",
    "PROMPTS",
    "REWRITERS",
    "GeneratorOptions",
    "GeneratorSet",
    "Prompt",
    "Request",
    "SamplingConfig",
    "TextCache",
    "create_generator",
    "default_generation_cache",
    "generate_cached",
    "resolve_prompt",
]

"""Vision-language backbones registered by name in ``BACKBONES``."""

from cirlab.registry import BACKBONES

__all__ = ["BACKBONES"]

"""Composed-retrieval methods, one file each, registered by name in ``METHODS``."""

from cirlab.methods import baselines, combiner, lincir, pic2word, searle  # noqa: F401  (registration)
from cirlab.methods.base import CIRMethod, Stage, create_method, load_method, register_method
from cirlab.registry import METHODS

__all__ = ["METHODS", "CIRMethod", "Stage", "create_method", "load_method", "register_method"]

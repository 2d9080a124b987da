"""Composed-retrieval methods, one file each, registered by name in ``METHODS``."""

from cirlab.methods import (  # noqa: F401  (registration)
    baselines,
    cirevl,
    combiner,
    fusion_diff,
    ldre,
    lincir,
    map_to_compose,
    osrcir,
    pic2word,
    searle,
    searle_oti,
    tmcir,
)
from cirlab.methods.base import CIRMethod, Stage, create_method, load_method, register_method
from cirlab.registry import METHODS

__all__ = ["METHODS", "CIRMethod", "Stage", "create_method", "load_method", "register_method"]

"""Composed-retrieval methods, one file each, registered by name in ``METHODS``."""

from cirlab.registry import METHODS

__all__ = ["METHODS"]

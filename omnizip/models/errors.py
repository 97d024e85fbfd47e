"""Typed errors of the model adapters, so callers can tell bad input from a broken model."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model could not be built or loaded: unknown preset, bad path, wrong architecture."""


class InputShapeError(ValueError):
    """Audio or frames handed to an adapter have the wrong shape, dtype or rate."""

"""Moved to :mod:`omnizip.codec`; this re-export goes once pipeline.actors imports it from there."""
from omnizip.codec import CodecError, decode, encode  # noqa: F401

"""OmniZip: audio-guided dynamic token compression for omnimodal LLMs (arXiv 2511.14582),
offline (``compress_clip``) and streaming (``StreamCompressor``).

Read in the paper's order: ``config`` -> ``audio`` (scores to dominant tokens, anchors and
merging) -> ``budget`` (audio retention to video ratios) -> ``video`` (ISTC) -> ``compress``
(the whole clip) -> ``stream`` (window by window). ``methods``: OmniZip and the baselines behind
one interface (``make_method``); ``codec``: the safe bytes of states and windows."""
from .compress import CompressedClip, WindowOutput, compress_clip
from .config import PAPER_SETTINGS, OmniZipConfig
from .methods import METHODS, CompressionMethod, make_method
from .stream import StreamCompressor

__all__ = [
    "OmniZipConfig",
    "PAPER_SETTINGS",
    "compress_clip",
    "CompressedClip",
    "StreamCompressor",
    "WindowOutput",
    "CompressionMethod",
    "METHODS",
    "make_method",
]

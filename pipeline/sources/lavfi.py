"""The lavfi side of the source policy: the allow-lists of generator and processing filters, and
a parser that reads a filter graph the way libavfilter does (av_get_token's quoting and escaping,
link labels, key=value options) so that no filter or option outside the allow-list - nothing
that reads a file, a URL or a socket - gets through. `lavfi_filters(graph)` raises
SourceRefused("lavfi:filter"). Used by pipeline.sources.policy (which re-exports it).
"""
from __future__ import annotations

import re

from pipeline.errors import SourceRefused

__all__ = ["GENERATOR_FILTERS", "PROCESSING_FILTERS", "lavfi_filters"]

# Source filters that generate media from their options and read nothing.
GENERATOR_FILTERS = frozenset({
    "testsrc", "testsrc2", "smptebars", "smptehdbars", "rgbtestsrc", "yuvtestsrc", "pal75bars",
    "pal100bars", "colorspectrum", "colorchart", "allrgb", "allyuv", "color", "nullsrc",
    "mandelbrot", "gradients", "sierpinski", "haldclutsrc",
    "sine", "anoisesrc", "aevalsrc", "anullsrc",
})
# Plain processing filters: frames in, frames out, options are numbers or expressions.
PROCESSING_FILTERS = frozenset({
    "null", "anull", "copy", "acopy", "scale", "format", "aformat", "fps", "setpts", "asetpts",
    "settb", "asettb", "trim", "atrim", "volume", "aresample", "pan", "amix", "amerge", "apad",
    "split", "asplit", "overlay", "hstack", "vstack", "concat", "crop", "pad", "hflip", "vflip",
    "transpose", "negate", "hue", "gblur", "noise", "drawbox", "drawgrid", "setsar", "setdar",
    "fade", "afade", "lowpass", "highpass", "tpad", "geq", "lutyuv", "lutrgb", "select", "aselect",
    "rotate", "edgedetect", "showwaves", "loop", "aloop", "atempo", "channelmap", "channelsplit",
    "join", "tremolo", "vibrato", "aeval",
})
_LAVFI_FILTERS = GENERATOR_FILTERS | PROCESSING_FILTERS
# Option names that point at something outside the graph, refused even on an allowed filter.
_FILEISH_KEY = re.compile(r"file|url|path|dir|font|model|plugin|shader|sofa|bind|dump|source|graph")
_NAME = re.compile(r"^[a-z0-9_]+$")
_LABEL = re.compile(r"^[A-Za-z0-9_]+$")
_WS = " \n\t\r"


def _get_token(s: str, i: int, term: str) -> tuple[str, int]:
    """FFmpeg's av_get_token: skip leading blanks, read up to an unescaped, unquoted character of
    `term`, removing one level of backslash escaping and '...' quoting; trailing blanks dropped."""
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    out: list[str] = []
    end = 0  # length of `out` that trailing-blank stripping may not cut into
    while i < n and s[i] not in term:
        c = s[i]
        i += 1
        if c == "\\" and i < n:
            out.append(s[i])
            i += 1
            end = len(out)
        elif c == "'":
            while i < n and s[i] != "'":
                out.append(s[i])
                i += 1
            if i < n:
                i += 1
                end = len(out)
        else:
            out.append(c)
    while len(out) > end and out[-1] in _WS:
        out.pop()
    return "".join(out), i


def _labels(g: str, i: int) -> int:
    n = len(g)
    while i < n and g[i] == "[":
        name, i = _get_token(g, i + 1, "]")
        if i >= n or g[i] != "]" or not _LABEL.match(name):
            raise SourceRefused("lavfi:filter", "malformed link label in the filter graph")
        i += 1
        while i < n and g[i] in _WS:
            i += 1
    return i


def _options(filt: str, args: str) -> None:
    """Split a filter's arguments as FFmpeg does (key=value or positional values, ':'-separated,
    a second level of escaping) and refuse option names or values that point outside the graph."""
    j, n = 0, len(args)
    while j < n:
        k = j
        while k < n and args[k] in _WS:
            k += 1
        ks = k
        while k < n and (args[k].isascii() and (args[k].isalnum() or args[k] in "-_/.")):
            k += 1
        key = args[ks:k]
        m = k
        while m < n and args[m] in _WS:
            m += 1
        if m < n and args[m] == "=":
            j = m + 1
            if not re.fullmatch(r"[A-Za-z0-9_]+", key) or _FILEISH_KEY.search(key.lower()):
                raise SourceRefused("lavfi:filter", f"option {key!r} of filter {filt!r} is not allowed")
        value, j = _get_token(args, j, ":")
        if "://" in value or re.match(r"^(file|https?|rtsps?|tcp|udp|pipe|concat|data):", value, re.I):
            raise SourceRefused("lavfi:filter", f"filter {filt!r} is given a URL")
        if j < n and args[j] == ":":
            j += 1


def lavfi_filters(graph: str) -> list[str]:
    """The filter names of a lavfi graph, parsed the way libavfilter parses it; raises
    SourceRefused("lavfi:filter") if it is malformed or a filter or option is not allowed."""
    g, i, n = graph, 0, len(graph)
    names: list[str] = []
    while True:
        while i < n and g[i] in _WS:
            i += 1
        i = _labels(g, i)
        raw_start = i
        name, i = _get_token(g, i, "=,;[")
        raw = g[raw_start:i]
        if "\\" in raw or "'" in raw:
            raise SourceRefused("lavfi:filter", "quoted or escaped filter names are not allowed")
        base = name.split("@", 1)[0]
        if "@" in name and not _LABEL.match(name.split("@", 1)[1]):
            raise SourceRefused("lavfi:filter", "malformed filter instance name")
        if not _NAME.match(base):
            raise SourceRefused("lavfi:filter", f"malformed filter name {base!r}")
        if base not in _LAVFI_FILTERS:
            raise SourceRefused("lavfi:filter", f"filter {base!r} is not on the allow-list of generator "
                                "and processing filters")
        names.append(base)
        if i < n and g[i] == "=":
            args, i = _get_token(g, i + 1, "[],;")
            _options(base, args)
        i = _labels(g, i)
        while i < n and g[i] in _WS:
            i += 1
        if i >= n:
            return names
        if g[i] not in ",;":
            raise SourceRefused("lavfi:filter", f"cannot parse the filter graph at {g[i:i + 12]!r}")
        i += 1

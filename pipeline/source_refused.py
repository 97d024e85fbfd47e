"""The source policy's refusal (`SourceRefused`, naming the rule) and the control-character rule
every check starts with. The base the policy's parts (host judging, lavfi parsing, typed options,
the guarded opener) build on, so they can raise it without importing pipeline.source_policy
(no import cycle); re-exported by pipeline.source_policy.
"""
from __future__ import annotations

import re

from pipeline.errors import UnsupportedSourceError
from pipeline.redact import redact

__all__ = ["SourceRefused", "has_control_chars"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class SourceRefused(UnsupportedSourceError):
    """The source policy refuses this source; nothing was opened. `rule` is a short code:
    scheme, control-char, url:invalid, host:loopback, host:link-local, host:unspecified,
    host:multicast, host:reserved, host:invalid, host:not-allowed, resolve, file:not-allowed,
    file:outside-roots, file:special, device:not-allowed, lavfi:not-allowed, lavfi:filter,
    option:not-allowed. A ValueError (and a pipeline.errors.SourceError): a client's mistake."""

    def __init__(self, rule: str, detail: str, url: str | None = None) -> None:
        self.rule, self._detail, self._url = rule, detail, url
        super().__init__(redact(f"source refused ({rule}): {detail}"),
                         None if url is None else redact(url))

    def __reduce__(self) -> tuple:  # crosses Ray (pickled) with its own arguments
        return (type(self), (self.rule, self._detail, self._url))


def has_control_chars(text: str) -> bool:
    """True if `text` holds a C0/C1 control character (CR, LF, NUL, DEL, ...) or a line separator."""
    return bool(_CONTROL.search(text))

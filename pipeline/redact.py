"""Untrusted text made safe: `redact(text)` strips passwords and token-like parameters from every
URL in a text, and Authorization / Bearer / Basic values; `has_control_chars(text)` is the one
control-character rule every check of a client's text uses. Shared vocabulary of every package
(errors, logs, API answers, metric labels show sources); imports only the standard library.
"""
from __future__ import annotations

import re
import urllib.parse
from typing import Any

__all__ = ["has_control_chars", "redact"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

_URL_IN_TEXT = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)([^\s'\"<>`]*)")
_PARAM = re.compile(r"([?&#;])([^=&#?;]*)=([^&#;]*)")
_AUTH_HEADER = re.compile(
    r"(?i:\b(?:proxy-)?authorization\s*[:=]\s*(?:(?:bearer|basic|digest|token)\s+)?)"
    r"(?!\*\*\*|(?i:bearer|basic|digest|token)\b)([^\s'\",;]{4,})")
_AUTH_BARE = re.compile(r"\b(?:Bearer|Basic)\s+(?!\*\*\*)([A-Za-z0-9._~+/\-]{8,}=*)")
_SECRET_KEYS = frozenset({
    "token", "key", "api_key", "apikey", "api-key", "access_token", "refresh_token", "id_token",
    "auth", "authorization", "password", "passwd", "pwd", "pass", "secret", "client_secret", "sig",
    "signature", "session", "sessionid", "credential", "credentials", "jwt", "bearer", "hdnts",
    "hdnea", "hdntl", "policy", "key-pair-id", "code",
})
_SECRET_PARTS = ("token", "secret", "passw", "signature", "credential", "apikey", "api_key", "auth")
_SECRET_PREFIXES = ("x-amz-", "x-goog-", "x-ms-", "x-oss-", "x-cos-")


def _secret_key(key: str) -> bool:
    k = urllib.parse.unquote(key).strip().lower()
    return (k in _SECRET_KEYS or any(p in k for p in _SECRET_PARTS)
            or k.startswith(_SECRET_PREFIXES))


def _redact_url(m: re.Match) -> str:
    scheme, rest = m.group(1), m.group(2)
    cut = len(rest)
    for ch in "?#":
        i = rest.find(ch)
        if i != -1:
            cut = min(cut, i)
    at = rest.rfind("@", 0, cut)  # the last '@' of the authority (a password may hold '/' or '@')
    if at != -1:
        rest = "***" + rest[at:]
    rest = _PARAM.sub(lambda p: p.group(0) if not _secret_key(p.group(2))
                      else f"{p.group(1)}{p.group(2)}=***", rest)
    return scheme + rest


def redact(text: Any) -> str:
    """`text` with credentials removed from every URL in it: `user:password@` becomes `***@`,
    and token-like query or fragment parameters (token, key, api_key, access_token, auth,
    password, sig, signature, secret, X-Amz-*, ...) get the value `***`; `Authorization:` /
    `Bearer` / `Basic` values too. Idempotent; never raises."""
    s = text if isinstance(text, str) else str(text)
    s = _URL_IN_TEXT.sub(_redact_url, s)
    s = _AUTH_HEADER.sub(lambda m: m.group(0)[: m.start(1) - m.start(0)] + "***", s)
    return _AUTH_BARE.sub(lambda m: m.group(0)[: m.start(1) - m.start(0)] + "***", s)


def has_control_chars(text: str) -> bool:
    """True if `text` holds a C0/C1 control character (CR, LF, NUL, DEL, ...) or a line separator:
    such text could forge a log line, a header or an FFmpeg option, so it is refused everywhere."""
    return bool(_CONTROL.search(text))

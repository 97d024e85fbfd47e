"""Typed errors every package raises and the HTTP layer maps (pipeline.api.errors), so callers can
tell a wrong URL from a dead camera, a name taken from a limit reached. Shared vocabulary: imports
only pipeline.redact (messages and URLs reach clients and logs redacted).
"""
from __future__ import annotations

from pipeline.redact import redact


class SourceError(RuntimeError):
    """Base of every ingestion error; `url` names the source that failed. Both the message and
    `url` are redacted (no user:password@, no token parameters): they reach clients and logs."""

    def __init__(self, message: str, url: str | None = None) -> None:
        from pipeline.redact import redact  # late: source_policy builds on this module

        super().__init__(redact(message))
        self.url = None if url is None else redact(url)


class UnsupportedSourceError(SourceError, ValueError):
    """The URL's scheme or form is not one the service can ingest."""


class SourceUnavailableError(SourceError):
    """The source exists in principle but cannot be reached: refused, unknown host, no device,
    missing file, or a live source that did not come back within the reconnect policy."""


class SourceTimeoutError(SourceUnavailableError, TimeoutError):
    """The source did not answer within the configured open/read timeout."""


class NotMediaError(SourceError):
    """The source answered, but what it holds is not decodable audio or video."""


class SourceRefused(UnsupportedSourceError):
    """The source policy refuses this source; nothing was opened. `rule` is a short code:
    scheme, control-char, url:invalid, host:loopback, host:link-local, host:unspecified,
    host:multicast, host:reserved, host:invalid, host:not-allowed, resolve, file:not-allowed,
    file:outside-roots, file:special, device:not-allowed, lavfi:not-allowed, lavfi:filter,
    option:not-allowed, push:not-allowed. A ValueError (and a pipeline.errors.SourceError): a client's mistake."""

    def __init__(self, rule: str, detail: str, url: str | None = None) -> None:
        self.rule, self._detail, self._url = rule, detail, url
        super().__init__(redact(f"source refused ({rule}): {detail}"),
                         None if url is None else redact(url))

    def __reduce__(self) -> tuple:  # crosses Ray (pickled) with its own arguments
        return (type(self), (self.rule, self._detail, self._url))


# Refusals the engine raises that the HTTP layer turns into their own status codes (a plain
# ValueError is a 400, a KeyError a 404).

class NameTaken(ValueError):
    """A stream with this name already belongs to the same key (409)."""

    param = "name"


class LimitExceeded(Exception):
    """A configured limit is reached (429); ``retry_after_s`` says when to try again."""

    def __init__(self, message: str, param: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.param = param
        self.retry_after_s = int(retry_after_s)


class StoreUnavailable(Exception):
    """The store (Redis) does not answer: the request can be retried shortly (503)."""

    retry_after_s = 5


class StreamFailed(Exception):
    """The stream failed for good (its context cannot be held: the message says why); a question
    about it is answered 409 naming the reason, not 404."""

    param = "stream_id"


class PushRefused(Exception):
    """A publisher's request on a push stream (WebRTC/WHIP) refused with its own HTTP status:
    401 a missing or wrong publish token, 409 a second publisher, 413 an offer over the size
    limit, 415 a body that is not SDP, 400 an offer that cannot be used (the message names why),
    404 no such publishing session. ``param`` names what is wrong."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = int(status), param

    def __reduce__(self) -> tuple:  # crosses Ray (pickled) with its own arguments
        return (type(self), (self.status, str(self), self.param))

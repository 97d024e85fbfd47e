"""Typed errors of the ingestion layer, so callers can tell a wrong URL from a dead camera."""
from __future__ import annotations


class SourceError(RuntimeError):
    """Base of every ingestion error; `url` names the source that failed. Both the message and
    `url` are redacted (no user:password@, no token parameters): they reach clients and logs."""

    def __init__(self, message: str, url: str | None = None) -> None:
        from pipeline.source_policy import redact  # late: source_policy builds on this module

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

"""Refusals the engine raises that the HTTP layer turns into their own status codes (a plain
ValueError is a 400, a KeyError a 404): a name already taken (409) and a limit reached (429)."""

from __future__ import annotations

__all__ = ["LimitExceeded", "NameTaken", "StoreUnavailable"]


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

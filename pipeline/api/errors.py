"""The one mapping from errors to HTTP: OpenAI's error shape ``{"error": {"message", "type",
"param", "code"}}`` for every route. 422 schema errors (``param`` names the field), 404 unknown
stream, 400 a ValueError from the engine, 409 a name taken, 429 a limit, 503 the engine or the
store away. A 500 (and the engine-away 503) never carries a backend's text: Redis, Ray or a
library may name hosts, keys, paths or internals; the client gets "internal error" and a
reference, the log gets the reference with the whole error."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

__all__ = ["ApiError", "install_error_handlers", "internal_error", "to_api_error"]

log = logging.getLogger("pipeline.api.app")


class ApiError(Exception):
    """An error that becomes an HTTP response in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 whose message names every bad field (``omnizip.rho_audio: ...``), not just a list."""
    details = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
                "type": str(e.get("type", ""))} for e in exc.errors()]
    fields = [".".join(d["loc"][1:] if d["loc"][:1] == ["body"] else d["loc"]) or "body"
              for d in details]
    message = "; ".join(f"{f}: {d['msg']}" for f, d in zip(fields, details)) or "invalid request"
    err = ApiError(422, message, param=fields[0] if fields else None)
    return JSONResponse({**err.body(), "detail": details}, status_code=422)


def cause_of(exc: BaseException) -> BaseException:
    """The engine's own exception inside Ray's RayTaskError wrapper."""
    return getattr(exc, "cause", None) or exc


def _message(exc: BaseException) -> str:
    # KeyError quotes its argument; the engine's KeyErrors carry the stream id or a sentence.
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc) or type(exc).__name__


def internal_error(exc: BaseException, what: str = "internal error") -> ApiError:
    """A generic 500: the error and a reference logged here, only the reference sent."""
    ref = uuid.uuid4().hex[:12]
    log.error("%s, ref %s", what, ref, exc_info=exc)
    return ApiError(500, f"internal error; reference {ref}", "internal_error")


async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
    err = internal_error(exc, "unhandled error in a route")
    return JSONResponse(err.body(), status_code=500)


def to_api_error(exc: BaseException, stream_id: str | None = None) -> ApiError:
    from ray.exceptions import RayActorError

    cause = cause_of(exc)
    if isinstance(exc, RayActorError) or isinstance(cause, RayActorError):
        ref = uuid.uuid4().hex[:12]
        log.warning("engine unavailable, ref %s: %r", ref, cause)
        return ApiError(503, f"the engine is unavailable (restarting?); retry shortly; reference {ref}",
                        "service_unavailable", headers={"Retry-After": "1"})
    from pipeline.errors import LimitExceeded, NameTaken, PushRefused, StoreUnavailable, StreamFailed
    from pipeline.redact import redact

    if isinstance(cause, PushRefused):
        return ApiError(cause.status, _message(cause), _PUSH_TYPES.get(cause.status, "invalid_request_error"),
                        cause.param, {"WWW-Authenticate": 'Bearer realm="whip"'} if cause.status == 401 else None)

    if isinstance(cause, StoreUnavailable):
        return ApiError(503, _message(cause), "service_unavailable",
                        headers={"Retry-After": str(cause.retry_after_s)})
    if isinstance(cause, LimitExceeded):
        return ApiError(429, _message(cause), "rate_limit_exceeded", cause.param,
                        {"Retry-After": str(cause.retry_after_s)})
    if isinstance(cause, NameTaken):
        return ApiError(409, _message(cause), "conflict", cause.param)
    if isinstance(cause, StreamFailed):
        return ApiError(409, f"the stream failed: {_message(cause)}", "conflict", "stream_id")
    if isinstance(cause, KeyError):
        what = stream_id if stream_id is not None else _message(cause)
        return ApiError(404, f"no stream {what!r}", "not_found", param="stream_id")
    if isinstance(cause, (ValueError, TypeError)):
        return ApiError(400, redact(_message(cause)), param=getattr(cause, "param", None) or _rule_param(cause))
    return internal_error(exc, "engine error")


_PUSH_TYPES = {401: "authentication_error", 404: "not_found", 409: "conflict"}


def _rule_param(exc: BaseException) -> str | None:
    """The field a source refusal is about (``source``), or the one a 'field: message' names."""
    from pipeline.errors import SourceError

    if isinstance(exc, SourceError):
        return "source"
    head = _message(exc).split(":", 1)[0]
    return head if head.replace("_", "").replace(".", "").isalnum() and " " not in head else None


def install_error_handlers(app: FastAPI) -> None:
    """Every ApiError and schema error of ``app`` answered in OpenAI's shape."""
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unhandled)  # no traceback text ever reaches a client

"""The HTTP front of the service: a Ray Serve deployment with a FastAPI ingress over the engine
(``pipeline.service.StreamService``, one named Ray actor that owns every stream).

Routes (README "HTTP API"):
  POST   /v1/streams                 create a stream -> 201 + its status
  GET    /v1/streams                 every stream's status
  GET    /v1/streams/{id}            one stream: status, lag, windows, tokens in/kept per modality
  DELETE /v1/streams/{id}            stop and forget it
  POST   /v1/streams/{id}/ask        answer a question (JSON, or SSE with "stream": true)
  POST   /v1/chat/completions        OpenAI-compatible; `model` = stream id or name
  GET    /v1/models[/{id}]           the streams, as OpenAI models
  GET    /healthz                    200 when the engine answers and says it is ok, else 503
  + per-window data and pictures, the source probe and the web console: pipeline.serve_console

The replica holds no model and no stream: it validates, forwards to the engine actor and turns
its answers into JSON or Server-Sent Events, so it stays light (a tenth of a CPU) and any number
of replicas can share one engine. Errors use OpenAI's shape ``{"error": {"message", "type",
"param", "code"}}``: 422 schema errors (``param`` names the field), 404 unknown stream, 400 a
ValueError from the engine (e.g. an unsupported source scheme), 503 engine unavailable.

``app`` (module level) is what ``serve run deploy/serve_config.yaml`` imports; its engine settings
come from the environment (``ServiceConfig.from_env``). Tests and the CLI use :func:`build_app`.
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from pipeline.gate import ApiGate, GateSettings, parse_keys
from pipeline.serve_console import ConsoleRoutes, install as install_console
from pipeline.messages import AnswerEnd, AnswerStart
from pipeline.api_models import (
    AskRequest, AskResponse, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
    ChoiceMessage, ChunkChoice, CreateStreamRequest, DeleteResponse, Delta, ErrorResponse,
    ModelCard, ModelList, StreamList, StreamStatus, Usage,
)

__all__ = ["fastapi_app", "OmniZipAPI", "build_app", "app", "ApiError"]

log = logging.getLogger(__name__)

fastapi_app = FastAPI(
    title="OmniZip-Stream",
    summary="Ask questions about live audio-video streams (Qwen2.5-Omni + OmniZip compression).",
    version="0.1.0",
    responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
               422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _GateState:
    """The front door's settings in this process (one Serve replica = one OmniZipAPI)."""

    settings = GateSettings()


fastapi_app.add_middleware(ApiGate, settings_source=lambda: _GateState.settings)
install_console(fastapi_app)  # per-window data and pictures, source probe, the web console at /


def gate_settings(given: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> GateSettings:
    """The front door's settings: ``given`` (build_app's) over the environment (OMNIZIP_API_KEYS,
    OMNIZIP_INSECURE, OMNIZIP_MAX_BODY_BYTES, OMNIZIP_REQUESTS_PER_S, OMNIZIP_REQUEST_BURST)."""
    import os

    env = os.environ if environ is None else environ
    g = dict(given or {})
    keys = tuple(g.get("api_keys") or ()) + parse_keys(env.get("OMNIZIP_API_KEYS"))
    try:
        return GateSettings(
            api_keys=parse_keys(keys),
            insecure=bool(g.get("insecure", env.get("OMNIZIP_INSECURE", "").strip().lower() in ("1", "true", "yes"))),
            max_body_bytes=int(g.get("max_body_bytes", env.get("OMNIZIP_MAX_BODY_BYTES", 1 << 20))),
            requests_per_s=float(g.get("requests_per_s", env.get("OMNIZIP_REQUESTS_PER_S", 20.0))),
            request_burst=int(g.get("request_burst", env.get("OMNIZIP_REQUEST_BURST", 40))))
    except (TypeError, ValueError) as e:
        raise ValueError(f"front door settings: {e}") from None


# --- errors -----------------------------------------------------------------------------------

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


@fastapi_app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 whose message names every bad field (``omnizip.rho_audio: ...``), not just a list."""
    details = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
                "type": str(e.get("type", ""))} for e in exc.errors()]
    fields = [".".join(d["loc"][1:] if d["loc"][:1] == ["body"] else d["loc"]) or "body"
              for d in details]
    message = "; ".join(f"{f}: {d['msg']}" for f, d in zip(fields, details)) or "invalid request"
    err = ApiError(422, message, param=fields[0] if fields else None)
    return JSONResponse({**err.body(), "detail": details}, status_code=422)


def _cause(exc: BaseException) -> BaseException:
    """The engine's own exception inside Ray's RayTaskError wrapper."""
    return getattr(exc, "cause", None) or exc


def _message(exc: BaseException) -> str:
    # KeyError quotes its argument; the engine's KeyErrors carry the stream id or a sentence.
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc) or type(exc).__name__


def _to_api_error(exc: BaseException, stream_id: str | None = None) -> ApiError:
    from ray.exceptions import RayActorError

    cause = _cause(exc)
    if isinstance(exc, RayActorError) or isinstance(cause, RayActorError):
        return ApiError(503, f"the engine is unavailable: {_message(cause)}", "service_unavailable")
    from pipeline.refusals import LimitExceeded, NameTaken, StoreUnavailable
    from pipeline.source_policy import redact

    if isinstance(cause, StoreUnavailable):
        return ApiError(503, _message(cause), "service_unavailable",
                        headers={"Retry-After": str(cause.retry_after_s)})
    if isinstance(cause, LimitExceeded):
        return ApiError(429, _message(cause), "rate_limit_exceeded", cause.param,
                        {"Retry-After": str(cause.retry_after_s)})
    if isinstance(cause, NameTaken):
        return ApiError(409, _message(cause), "conflict", cause.param)
    if isinstance(cause, KeyError):
        what = stream_id if stream_id is not None else _message(cause)
        return ApiError(404, f"no stream {what!r}", "not_found", param="stream_id")
    if isinstance(cause, (ValueError, TypeError)):
        return ApiError(400, redact(_message(cause)), param=getattr(cause, "param", None) or _rule_param(cause))
    log.exception("engine error", exc_info=exc)
    return ApiError(500, f"internal error: {type(cause).__name__}: {_message(cause)}", "internal_error")


def _rule_param(exc: BaseException) -> str | None:
    """The field a source refusal is about (``source``), or the one a 'field: message' names."""
    from pipeline.errors import SourceError

    if isinstance(exc, SourceError):
        return "source"
    head = _message(exc).split(":", 1)[0]
    return head if head.replace("_", "").replace(".", "").isalnum() and " " not in head else None


def _tenant(request: Request) -> str:
    """The tenant the front door (pipeline.gate) authenticated this request as."""
    return str(getattr(request.state, "tenant", ""))


def _sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class _Answer:
    """An answer on its way from the engine: ``start`` (AnswerStart: the prompt's size), then
    ``pieces()`` (text, never half a character), then ``end`` (AnswerEnd) once they are read."""

    def __init__(self, start: AnswerStart, gen: Any) -> None:
        self.start, self._gen = start, gen
        self.end = AnswerEnd(0, "stop")

    async def pieces(self) -> AsyncIterator[str]:
        async for ref in self._gen:
            event = await ref
            if isinstance(event, AnswerEnd):
                self.end = event
            elif isinstance(event, str):
                yield event

    def usage(self) -> Usage:
        prompt = self.start.context_tokens + self.start.question_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=self.end.completion_tokens,
                     total_tokens=prompt + self.end.completion_tokens,
                     prompt_tokens_details={"cached_tokens": self.start.context_tokens})


# --- the deployment ----------------------------------------------------------------------------

def _service_config(config: Any) -> Any:
    """The engine's settings: from the environment when none are given (``serve run``). Device
    ``auto`` (the deploy files' default) stays as it is: each model actor resolves it where it
    runs (pipeline.runtime.resolve_device)."""
    from pipeline.service import ServiceConfig

    return ServiceConfig.from_env() if config is None else ServiceConfig.coerce(config)


def _replica_id() -> str:
    """This replica's id (Serve's, or a random one outside Serve)."""
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:
        import uuid

        return uuid.uuid4().hex


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=100)
@serve.ingress(fastapi_app)
class OmniZipAPI(ConsoleRoutes):
    """One replica: validates requests and forwards them to the engine actor."""

    def __init__(self, config: Mapping[str, Any] | None = None, gate: Mapping[str, Any] | None = None) -> None:
        from pipeline.service import get_or_create_service

        _GateState.settings = gate_settings(gate)
        if not _GateState.settings.api_keys:
            log.warning("no API keys configured: %s", "every client is served (insecure)" if _GateState.settings.insecure
                        else "only loopback clients are served")
        self._config = _service_config(config)
        self._service = get_or_create_service(self._config)
        self._replica_id = _replica_id()
        self._service.register_replica.remote(self._replica_id)  # the engine lives while replicas use it

    async def check_health(self) -> None:
        """Serve's periodic health check: renews this replica's lease on the engine. The engine
        being away is not this replica's illness (requests answer 503 meanwhile)."""
        try:
            await asyncio.wait_for(self._service.register_replica.remote(self._replica_id), 5)
        except Exception as exc:
            log.warning("could not renew the engine lease: %r", exc)

    def __del__(self) -> None:
        """Serve shuts this replica down (app deleted, redeploy, downscale): release the engine,
        which stops once no replica uses it."""
        try:
            self._service.release_replica.remote(self._replica_id)
        except Exception:
            pass

    # -- engine calls ---------------------------------------------------------------------------
    async def _call(self, method: str, *args: Any, stream_id: str | None = None, **kwargs: Any) -> Any:
        """One engine call, its errors mapped to HTTP; a dead engine actor is looked up again
        (the engine restarts itself) so the next request reaches the new one."""
        from ray.exceptions import RayActorError

        try:
            return await getattr(self._service, method).remote(*args, **kwargs)
        except Exception as e:
            if isinstance(e, RayActorError):
                self._reconnect()
            raise _to_api_error(e, stream_id) from e

    def _reconnect(self) -> None:
        """Look the engine up again (never create it here: an engine that is gone for good was
        retired by a newer deployment, which this replica is about to make way for)."""
        from pipeline.service import find_service

        handle = find_service(self._config)
        if handle is not None:
            self._service = handle

    async def _resolve(self, ref: str, owner: str) -> dict[str, Any]:
        """One of ``owner``'s streams by id, else by name (the OpenAI `model`); 404 otherwise."""
        try:
            return await self._call("get_stream", ref, stream_id=ref, owner=owner)
        except ApiError as e:
            if e.status != 404:
                raise
        named = [s for s in await self._call("list_streams", owner=owner) if s.get("name") == ref]
        if len(named) == 1:
            return named[0]
        if not named:
            raise ApiError(404, f"no stream with id or name {ref!r}", "not_found", param="model")
        raise ApiError(400, f"{len(named)} streams are named {ref!r}; use one's id: "
                       f"{sorted(s['id'] for s in named)}", param="model")

    async def _answer(self, stream_id: str, question: str | None, max_tokens: int, owner: str,
                      messages: list[dict] | None = None) -> "_Answer":
        """The engine's answer: its first event (the prompt's size) is awaited before this
        returns, so an unknown stream is a 404 and not a broken event stream."""
        gen = self._service.ask_events.options(num_returns="streaming").remote(
            stream_id, question, max_tokens, owner=owner, messages=messages)
        try:
            start = await (await gen.__anext__())
        except StopAsyncIteration:
            raise ApiError(500, "the engine ended the answer before it began", "internal_error") from None
        except Exception as e:
            raise _to_api_error(e, stream_id) from e
        return _Answer(start, gen)

    # -- routes ---------------------------------------------------------------------------------
    @fastapi_app.get("/healthz", summary="Liveness of the HTTP app and the engine")
    async def healthz(self) -> JSONResponse:
        try:
            health = await self._call("health")
        except ApiError as e:
            return JSONResponse({"ok": False, "error": e.message}, status_code=503)
        return JSONResponse(health, status_code=200 if health.get("ok") else 503)

    @fastapi_app.post("/v1/streams", status_code=201, response_model=StreamStatus,
                      response_model_exclude_none=False, summary="Start watching a source")
    async def create_stream(self, body: CreateStreamRequest, request: Request) -> dict[str, Any]:
        return await self._call("create_stream", body.to_spec(), owner=_tenant(request))

    @fastapi_app.get("/v1/streams", response_model=StreamList, summary="Every stream's status")
    async def list_streams(self, request: Request) -> dict[str, Any]:
        return {"streams": await self._call("list_streams", owner=_tenant(request))}

    @fastapi_app.get("/v1/streams/{stream_id}", response_model=StreamStatus,
                     summary="One stream: status, lag, windows, tokens in/kept per modality")
    async def get_stream(self, stream_id: str, request: Request) -> dict[str, Any]:
        return await self._call("get_stream", stream_id, stream_id=stream_id, owner=_tenant(request))

    @fastapi_app.delete("/v1/streams/{stream_id}", response_model=DeleteResponse,
                        summary="Stop a stream and drop its context")
    async def delete_stream(self, stream_id: str, request: Request) -> dict[str, Any]:
        await self._call("delete_stream", stream_id, stream_id=stream_id, owner=_tenant(request))
        return {"id": stream_id, "deleted": True}

    @fastapi_app.post("/v1/streams/{stream_id}/ask", response_model=AskResponse,
                      summary="Ask about what the stream has shown so far")
    async def ask(self, stream_id: str, body: AskRequest, request: Request) -> Any:
        owner = _tenant(request)
        status = await self._call("get_stream", stream_id, stream_id=stream_id, owner=owner)
        answer = await self._answer(stream_id, body.question, body.max_tokens, owner)

        def summary(text: str) -> AskResponse:
            return AskResponse(stream_id=stream_id, question=body.question, answer=text,
                               completion_tokens=answer.end.completion_tokens,
                               finish_reason=answer.end.finish_reason,
                               context_tokens=answer.start.context_tokens,
                               windows=int(status.get("windows", 0)))

        if not body.stream:
            return summary("".join([p async for p in answer.pieces()]))

        async def events() -> AsyncIterator[str]:
            parts: list[str] = []
            try:
                async for p in answer.pieces():
                    parts.append(p)
                    yield _sse({"text": p}, "token")
            except Exception as e:  # headers are sent: report in-band
                yield _sse(_to_api_error(e, stream_id).body(), "error")
                return
            yield _sse(summary("".join(parts)).model_dump(), "done")

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @fastapi_app.post("/v1/chat/completions", summary="OpenAI-compatible chat; `model` names the stream")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        owner = _tenant(request)
        stream = await self._resolve(body.model, owner)
        sid, max_tokens = stream["id"], body.answer_budget()
        # The conversation (system messages and earlier turns) is folded into the question by the
        # model's own rules; usage counts the stream's cached context plus that question.
        answer = await self._answer(sid, None, max_tokens, owner,
                                    messages=[m.model_dump(exclude_none=True) for m in body.messages])
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if not body.stream:
            text = "".join([p async for p in answer.pieces()])
            return ChatCompletion(
                id=cid, created=created, model=body.model,
                choices=[Choice(message=ChoiceMessage(content=text), finish_reason=answer.end.finish_reason)],
                usage=answer.usage()).model_dump()

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: Delta, reason: str | None = None, use: Usage | None = None,
                  choices: bool = True) -> str:
            c = ChatCompletionChunk(id=cid, created=created, model=body.model, usage=use,
                                    choices=[ChunkChoice(delta=delta, finish_reason=reason)] if choices else [])
            return _sse(c.model_dump_json(exclude_none=False))

        async def events() -> AsyncIterator[str]:
            yield chunk(Delta(role="assistant", content=""))
            try:
                async for p in answer.pieces():
                    yield chunk(Delta(content=p))
            except Exception as e:
                yield _sse(_to_api_error(e, sid).body())
                yield _sse("[DONE]")
                return
            yield chunk(Delta(), answer.end.finish_reason)
            if include_usage:
                yield chunk(Delta(), use=answer.usage(), choices=False)
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @fastapi_app.get("/v1/models", response_model=ModelList, summary="The streams, as OpenAI models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        return {"object": "list",
                "data": [self._card(s) for s in await self._call("list_streams", owner=_tenant(request))]}

    @fastapi_app.get("/v1/models/{model}", response_model=ModelCard, summary="One stream as a model")
    async def get_model(self, model: str, request: Request) -> dict[str, Any]:
        return self._card(await self._resolve(model, _tenant(request)))

    @staticmethod
    def _card(s: Mapping[str, Any]) -> dict[str, Any]:
        return ModelCard(id=s["id"], created=int(s.get("created") or 0), name=s.get("name"),
                         status=s.get("status")).model_dump()


def build_app(config: Any = None, gate: Mapping[str, Any] | None = None, **deployment_options: Any) -> serve.Application:
    """The Serve application for ``serve.run``; ``config`` is a ServiceConfig, a dict of its
    fields, or None (``ServiceConfig.from_env()``); ``gate`` the front door's settings
    (pipeline.gate.GateSettings fields: api_keys, insecure, max_body_bytes, requests_per_s,
    request_burst) over the environment's. ``deployment_options`` go to ``OmniZipAPI.options``
    (num_replicas, ray_actor_options, ...)."""
    if config is not None and is_dataclass(config):
        config = asdict(config)  # plain data crosses to the replica
    dep = OmniZipAPI.options(**deployment_options) if deployment_options else OmniZipAPI
    return dep.bind(dict(config) if config is not None else None, dict(gate) if gate else None)


#: ``serve run deploy/serve_config.yaml`` / ``serve run pipeline.serve:app``.
app = build_app()

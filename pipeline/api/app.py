"""The HTTP front of the service: a Ray Serve deployment with a FastAPI ingress over the engine
(``pipeline.engine.service.StreamService``, one named Ray actor that owns every stream).

Routes (README "HTTP API"):
  POST   /v1/streams                 create a stream -> 201 + its status
  GET    /v1/streams                 every stream's status
  GET    /v1/streams/{id}            one stream: status, lag, windows, tokens in/kept per modality
  DELETE /v1/streams/{id}            stop and forget it
  POST   /v1/streams/{id}/ask        answer a question (JSON, or SSE with "stream": true)
  POST   /v1/chat/completions        OpenAI-compatible; `model` = stream id or name
  GET    /v1/models[/{id}]           the streams, as OpenAI models
  GET    /healthz                    200 when the engine answers and says it is ok, else 503 (details with a key)
  POST   /v1/whip/{id} (+ OPTIONS, PATCH/DELETE on its session)   a push stream's publisher: pipeline.api.whip
  GET    /v1/realtime (WebSocket), POST /v1/realtime/client_secrets   OpenAI Realtime: pipeline.api.realtime
  + per-window data and pictures, the source probe and the web console: pipeline.api.console

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
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from pipeline.api.errors import ApiError, install_error_handlers, to_api_error
from pipeline.api.gate import ApiGate, GateSettings, gate_settings, tenant
from pipeline.api.console import ConsoleRoutes, install as install_console
from pipeline.api.whip import WhipRoutes, absolute_ingest, install as install_whip
from pipeline.api.watches import WatchRoutes, install as install_watches
from pipeline.api.realtime import RealtimeRoutes, install as install_realtime
from pipeline.core.messages import AnswerEnd, AnswerStart, QuestionRoute
from pipeline.api.models import (
    AskRequest, AskResponse, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
    ChoiceMessage, ChunkChoice, CreateStreamRequest, DeleteResponse, Delta, ErrorResponse,
    ModelCard, ModelList, StreamList, StreamStatus, Usage,
)

__all__ = ["fastapi_app", "OmniZipAPI", "build_app", "app"]

log = logging.getLogger(__name__)

fastapi_app = FastAPI(
    title="OmniZip-Stream",
    summary="Ask questions about live audio-video streams (Qwen2.5-Omni + OmniZip compression).",
    version="0.1.0",
    responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
               422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)

ROUTE_TTL_S = 10.0  # a question's route (stream, decoder) is reused this long per tenant
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _GateState:
    """The front door's settings in this process (one Serve replica = one OmniZipAPI)."""

    settings = GateSettings()


fastapi_app.add_middleware(ApiGate, settings_source=lambda: _GateState.settings)
install_error_handlers(fastapi_app)
install_console(fastapi_app)  # per-window data and pictures, source probe, the web console at /
install_whip(fastapi_app)  # publishers of push streams (WHIP)
install_watches(fastapi_app)  # standing questions, their events (JSON, SSE)
install_realtime(fastapi_app, lambda: _GateState.settings)  # /v1/realtime: OpenAI Realtime over a stream


def _sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class _Answer:
    """An answer on its way from the engine: ``start`` (AnswerStart: the prompt's size), then
    ``pieces()`` (text, never half a character), then ``end`` (AnswerEnd) once they are read."""

    def __init__(self, stream_id: str, start: AnswerStart, gen: Any) -> None:
        self.stream_id, self.start, self._gen = stream_id, start, gen
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
    runs (pipeline.engine.runtime.resolve_device)."""
    from pipeline.core.config import ServiceConfig

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
class OmniZipAPI(ConsoleRoutes, WhipRoutes, WatchRoutes, RealtimeRoutes):
    """One replica: validates requests and forwards them to the engine actor."""

    def __init__(self, config: Mapping[str, Any] | None = None, gate: Mapping[str, Any] | None = None) -> None:
        from pipeline.engine.service import get_or_create_service

        _GateState.settings = gate_settings(gate)
        if not _GateState.settings.api_keys:
            log.warning("no API keys configured: %s", "every client is served (insecure)" if _GateState.settings.insecure
                        else "only loopback clients are served")
        self._config = _service_config(config)
        self._service = get_or_create_service(self._config)
        self._replica_id = _replica_id()
        self._routes: dict[tuple[str, str, bool], tuple[float, QuestionRoute]] = {}  # (tenant, ref, by name) -> route
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
            raise to_api_error(e, stream_id) from e

    def _reconnect(self) -> None:
        """Look the engine up again (never create it here: an engine that is gone for good was
        retired by a newer deployment, which this replica is about to make way for)."""
        from pipeline.engine.service import find_service

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

    async def _route(self, ref: str, owner: str, by_name: bool) -> QuestionRoute:
        """The engine's route for a question on ``ref`` (ownership checked, the decoder found),
        kept ROUTE_TTL_S per tenant: a route is safe to reuse, since a decoder answers only for
        the streams it holds (a deleted or moved stream is refused, and the route made again)."""
        key = (owner, ref, by_name)
        hit = self._routes.get(key)
        if hit is not None and time.monotonic() - hit[0] < ROUTE_TTL_S:
            return hit[1]
        try:
            route = await self._call("route", ref, owner, by_name, stream_id=ref)
        except ApiError as e:
            if by_name and e.status == 404:  # the OpenAI `model` names the stream
                raise ApiError(404, f"no stream with id or name {ref!r}", "not_found", param="model") from None
            raise
        if len(self._routes) >= 4096:
            self._routes.clear()
        self._routes[key] = (time.monotonic(), route)
        return route

    async def _answer(self, ref: str, question: str | None, max_tokens: int, owner: str,
                      messages: list[dict] | None = None, by_name: bool = False) -> "_Answer":
        """The answer of the decoder that holds stream ``ref``'s context: the question is routed
        once (pipeline.engine.service.route; reused a few seconds), then the pieces come straight
        from the decoder. Its first event (the prompt's size) is awaited before this returns, so
        an unknown stream is a 404 and not a broken event stream."""
        for attempt in (0, 1):
            route = await self._route(ref, owner, by_name)
            gen = route.decoder.ask.options(num_returns="streaming").remote(
                route.stream_id, question, max_tokens, messages)
            try:
                start = await (await gen.__anext__())
            except StopAsyncIteration:
                raise ApiError(500, "the engine ended the answer before it began", "internal_error") from None
            except Exception as e:
                self._routes.pop((owner, ref, by_name), None)
                err = to_api_error(e, ref)
                if attempt == 0 and err.status in (404, 503):  # a stale route: ask the engine again
                    continue
                raise err from e
            return _Answer(route.stream_id, start, gen)
        raise AssertionError("unreachable")

    # -- routes ---------------------------------------------------------------------------------
    @fastapi_app.get("/healthz", summary="Liveness of the HTTP app and the engine")
    async def healthz(self, request: Request) -> JSONResponse:
        """ok/degraded for anyone; the engine's details (names, workers, the stream count of all
        tenants) only for a caller with a valid key: an open path tells a stranger nothing more."""
        detailed = bool(tenant(request))
        try:
            health = await self._call("health")
        except ApiError as e:
            return JSONResponse({"ok": False, "degraded": True, **({"error": e.message} if detailed else {})},
                                status_code=503)
        ok = bool(health.get("ok"))
        body = health if detailed else {"ok": ok, "degraded": bool(health.get("degraded"))}
        return JSONResponse(body, status_code=200 if ok else 503)

    @fastapi_app.post("/v1/streams", status_code=201, response_model=StreamStatus,
                      response_model_exclude_none=False, summary="Start watching a source")
    async def create_stream(self, body: CreateStreamRequest, request: Request) -> dict[str, Any]:
        return absolute_ingest(await self._call("create_stream", body.to_spec(), owner=tenant(request)), request)

    @fastapi_app.get("/v1/streams", response_model=StreamList, summary="Every stream's status")
    async def list_streams(self, request: Request) -> dict[str, Any]:
        return {"streams": [absolute_ingest(st, request) for st in await self._call("list_streams", owner=tenant(request))]}

    @fastapi_app.get("/v1/streams/{stream_id}", response_model=StreamStatus,
                     summary="One stream: status, lag, windows, tokens in/kept per modality")
    async def get_stream(self, stream_id: str, request: Request) -> dict[str, Any]:
        return absolute_ingest(await self._call("get_stream", stream_id, stream_id=stream_id, owner=tenant(request)),
                               request)

    @fastapi_app.delete("/v1/streams/{stream_id}", response_model=DeleteResponse,
                        summary="Stop a stream and drop its context")
    async def delete_stream(self, stream_id: str, request: Request) -> dict[str, Any]:
        await self._call("delete_stream", stream_id, stream_id=stream_id, owner=tenant(request))
        return {"id": stream_id, "deleted": True}

    @fastapi_app.post("/v1/streams/{stream_id}/ask", response_model=AskResponse,
                      summary="Ask about what the stream has shown so far")
    async def ask(self, stream_id: str, body: AskRequest, request: Request) -> Any:
        answer = await self._answer(stream_id, body.question, body.max_tokens, tenant(request))

        def summary(text: str) -> AskResponse:
            return AskResponse(stream_id=stream_id, question=body.question, answer=text,
                               completion_tokens=answer.end.completion_tokens,
                               finish_reason=answer.end.finish_reason,
                               context_tokens=answer.start.context_tokens,
                               windows=answer.start.windows)

        if not body.stream:
            return summary("".join([p async for p in answer.pieces()]))

        async def events() -> AsyncIterator[str]:
            parts: list[str] = []
            try:
                async for p in answer.pieces():
                    parts.append(p)
                    yield _sse({"text": p}, "token")
            except Exception as e:  # headers are sent: report in-band
                yield _sse(to_api_error(e, stream_id).body(), "error")
                return
            yield _sse(summary("".join(parts)).model_dump(), "done")

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @fastapi_app.post("/v1/chat/completions", summary="OpenAI-compatible chat; `model` names the stream")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        # The conversation (system messages and earlier turns) is folded into the question by the
        # model's own rules; usage counts the stream's cached context plus that question.
        answer = await self._answer(body.model, None, body.answer_budget(), tenant(request),
                                    messages=[m.model_dump(exclude_none=True) for m in body.messages], by_name=True)
        sid = answer.stream_id
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
                yield _sse(to_api_error(e, sid).body())
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
                "data": [self._card(s) for s in await self._call("list_streams", owner=tenant(request))]}

    @fastapi_app.get("/v1/models/{model}", response_model=ModelCard, summary="One stream as a model")
    async def get_model(self, model: str, request: Request) -> dict[str, Any]:
        return self._card(await self._resolve(model, tenant(request)))

    @staticmethod
    def _card(s: Mapping[str, Any]) -> dict[str, Any]:
        return ModelCard(id=s["id"], created=int(s.get("created") or 0), name=s.get("name"),
                         status=s.get("status")).model_dump()


def build_app(config: Any = None, gate: Mapping[str, Any] | None = None, **deployment_options: Any) -> serve.Application:
    """The Serve application for ``serve.run``; ``config`` is a ServiceConfig, a dict of its
    fields, or None (``ServiceConfig.from_env()``); ``gate`` the front door's settings
    (pipeline.api.gate.GateSettings fields: api_keys, insecure, max_body_bytes, requests_per_s,
    request_burst) over the environment's. ``deployment_options`` go to ``OmniZipAPI.options``
    (num_replicas, ray_actor_options, ...)."""
    if config is not None and is_dataclass(config):
        config = asdict(config)  # plain data crosses to the replica
    dep = OmniZipAPI.options(**deployment_options) if deployment_options else OmniZipAPI
    return dep.bind(dict(config) if config is not None else None, dict(gate) if gate else None)


#: ``serve run deploy/serve_config.yaml`` / ``serve run pipeline.api.app:app``.
app = build_app()

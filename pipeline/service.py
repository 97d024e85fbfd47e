"""The engine's front door: `StreamService` owns every stream (create, status, ask, delete) and
the actors behind them (pipeline.actors). It runs as the named Ray actor "omnizip-service"
(`get_or_create_service`), which the Serve app and the CLI call; every actor it starts is named
in the "omnizip" namespace, so a restarted service finds them again, and every stream's record
lives in the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline import actors
from pipeline.store import Retention, StreamNotFound

log = logging.getLogger(__name__)

__all__ = ["ServiceConfig", "StreamService", "get_or_create_service", "shutdown_service"]

_SPEC_KEYS = {"source", "name", "omnizip", "context_tokens", "lookahead", "realtime", "options", "size",
              "backpressure"}


@dataclass
class ServiceConfig:
    """Engine settings; the defaults are the embedded setup (local Ray, tiny model, in-process store)."""

    model: str = "tiny"  # preset name or local checkpoint path (omnizip.models.load_model)
    device: str = "cpu"
    dtype: str | None = None
    redis_url: str | None = None  # None -> in-process store hosted in one actor
    encoder_workers: int = 1
    decoder_actors: int = 1
    max_batch: int = 8  # windows of several streams batched in one encoder call
    queue_windows: int = 8  # bounded queue per stream, in each stage
    behind_policy: str = "drop_oldest"  # or "compress_harder"
    system_prompt: str | None = None
    # --- additions to the contract (all optional) ---
    name: str = "omnizip"  # actor name prefix: "<name>-service", "<name>-decoder-0", ...
    context_tokens: int = 8192  # default rolling-context budget of a stream
    max_lag_s: float = 4.0  # a window further behind live than this is behind (policy applies)
    decoder_delay_s: float = 0.0  # artificial delay per appended window (tests of the queue policy)
    retention_windows: int | None = 3600  # windows kept per stream in the store
    retention_s: float | None = None  # ... and/or media seconds kept
    cpus_per_actor: float = 0.25  # encoder workers and decoders without GPUs
    gpus_per_actor: float = 0.5  # encoder workers and decoders when device is cuda and GPUs exist
    ingest_cpus: float = 0.1
    torch_threads: int | None = None  # torch threads in each model actor (None: Ray's default)
    detached: bool = True  # actors outlive their creator (a Serve replica, a driver)

    def __post_init__(self) -> None:
        for name in ("encoder_workers", "decoder_actors", "max_batch", "queue_windows", "context_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ServiceConfig.{name} must be an integer >= 1, got {v!r}")
        if self.behind_policy not in actors.POLICIES:
            raise ValueError(f"ServiceConfig.behind_policy must be one of {list(actors.POLICIES)}, "
                             f"got {self.behind_policy!r}")
        for name in ("max_lag_s", "decoder_delay_s", "cpus_per_actor", "gpus_per_actor", "ingest_cpus"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"ServiceConfig.{name} must be a number >= 0, got {v!r}")
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "{}: \t\n"):
            raise ValueError(f"ServiceConfig.name must be a non-empty string without braces, colons or "
                             f"spaces, got {self.name!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ServiceConfig":
        """Fields from OMNIZIP_<FIELD> variables (OMNIZIP_MODEL, OMNIZIP_DEVICE, OMNIZIP_DTYPE,
        OMNIZIP_REDIS_URL, OMNIZIP_ENCODER_WORKERS, ...); unset ones keep their defaults."""
        env = os.environ if environ is None else environ
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"OMNIZIP_{f.name.upper()}")
            if raw is None:
                continue
            default = f.default
            try:
                if raw == "" and default is None:
                    kw[f.name] = None
                elif isinstance(default, bool):
                    kw[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                elif isinstance(default, int) or f.name in ("retention_windows", "torch_threads"):
                    kw[f.name] = int(raw)
                elif isinstance(default, float) or f.name == "retention_s":
                    kw[f.name] = float(raw)
                else:
                    kw[f.name] = raw
            except ValueError:
                raise ValueError(f"OMNIZIP_{f.name.upper()}={raw!r} is not a valid {f.name}") from None
        return cls(**kw)

    @classmethod
    def coerce(cls, config: "ServiceConfig | Mapping[str, Any] | None") -> "ServiceConfig":
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            unknown = set(config) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"unknown ServiceConfig field(s) {sorted(unknown)}")
            return cls(**dict(config))
        raise TypeError(f"config must be a ServiceConfig, a mapping or None, not {type(config).__name__}")


def _validate_spec(spec: Any, cfg: ServiceConfig) -> dict[str, Any]:
    """A create_stream spec, checked and completed with defaults; ValueError names the field."""
    from omnizip import OmniZipConfig
    from pipeline.sources import SourceOptions, classify

    if not isinstance(spec, Mapping):
        raise ValueError(f"spec must be a mapping, got {type(spec).__name__}")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown spec field(s) {sorted(unknown)}; known: {sorted(_SPEC_KEYS)}")
    source = spec.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ValueError("source: a non-empty string is required (rtsp://, http(s)://, a file, v4l2:, lavfi:)")
    classify(source.strip())  # UnsupportedSourceError (a ValueError) names the problem
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"name: must be a non-empty string or null, got {name!r}")
    oz = spec.get("omnizip") or {}
    if isinstance(oz, OmniZipConfig):
        oz = oz.to_dict()
    if not isinstance(oz, Mapping):
        raise ValueError(f"omnizip: must be a mapping of OmniZipConfig fields, got {type(oz).__name__}")
    try:
        ozc = OmniZipConfig.from_dict(dict(oz))
    except (TypeError, ValueError) as e:
        raise ValueError(f"omnizip: {e}") from None
    budget = spec.get("context_tokens")
    budget = cfg.context_tokens if budget is None else budget
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 128:
        raise ValueError(f"context_tokens: must be an integer >= 128, got {budget!r}")
    look = spec.get("lookahead", 0)
    look = 0 if look is None else look
    if isinstance(look, bool) or not isinstance(look, int) or not 0 <= look <= 64:
        raise ValueError(f"lookahead: must be an integer in [0, 64], got {look!r}")
    realtime = spec.get("realtime")
    if realtime is not None and not isinstance(realtime, bool):
        raise ValueError(f"realtime: must be true, false or null, got {realtime!r}")
    options = spec.get("options")
    if options is not None:
        try:
            SourceOptions.coerce(options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"options: {e}") from None
    backpressure = spec.get("backpressure")
    if backpressure is not None and not isinstance(backpressure, bool):
        raise ValueError(f"backpressure: must be true, false or null, got {backpressure!r}")
    size = spec.get("size")
    if size is not None:
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise ValueError(f"size: must be [height, width] in pixels, got {size!r}")
        size = [int(size[0]), int(size[1])]
    return {"source": source.strip(), "name": name, "realtime": realtime, "options": options, "size": size,
            "backpressure": bool(backpressure),
            "settings": {"omnizip": ozc.to_dict(), "context_tokens": budget, "lookahead": look}}


class StreamService:
    """The engine's front door. Plain class; runs as the named Ray actor "<name>-service"
    (get_or_create_service(config) -> ActorHandle); every method is async."""

    def __init__(self, config: ServiceConfig | Mapping[str, Any] | None = None) -> None:
        self.cfg = ServiceConfig.coerce(config)
        c = self.cfg
        retention = Retention(c.retention_windows, c.retention_s)
        handle = None if c.redis_url else actors.store_actor(retention, c.detached, f"{c.name}-store")
        self.store_ref = actors.StoreRef(c.redis_url, handle, retention)
        self.store = self.store_ref.connect()
        self.decoders = [actors.start_decoder(f"{c.name}-decoder-{i}", c, self.store_ref)
                         for i in range(c.decoder_actors)]
        self.workers = [actors.start_encoder(f"{c.name}-encoder-{i}", c, self.decoders, self.store_ref)
                        for i in range(c.encoder_workers)]
        self.ingest: dict[str, Any] = {}
        self._reattached = False

    async def _reattach(self) -> None:
        """Once: a restarted service finds the ingest actors of its streams again."""
        if self._reattached:
            return
        self._reattached = True
        for rec in await self._io(self.store.list_streams):
            if rec["id"] in self.ingest:
                continue
            try:
                self.ingest[rec["id"]] = ray.get_actor(self._ingest_name(rec["id"]), namespace=actors.NAMESPACE)
            except ValueError:
                pass

    def _ingest_name(self, sid: str) -> str:
        return f"{self.cfg.name}-ingest-{sid}"

    async def _io(self, fn: Any, *args: Any) -> Any:
        """A blocking store call off the event loop."""
        return await asyncio.to_thread(fn, *args)

    def _least_loaded(self, key: str, n: int, recs: list[dict]) -> int:
        load = [0] * n
        for r in recs:
            if r.get("status") not in ("ended", "failed") and 0 <= int(r.get(key, 0)) < n:
                load[int(r.get(key, 0))] += 1
        return min(range(n), key=lambda i: load[i])

    # ---- the contract ---------------------------------------------------------------------------
    async def create_stream(self, spec: dict) -> dict:
        rec = _validate_spec(spec, self.cfg)
        recs = await self._io(self.store.list_streams)
        rec["worker"] = self._least_loaded("worker", len(self.workers), recs)
        rec["decoder"] = self._least_loaded("decoder", len(self.decoders), recs)
        rec["status"] = "starting"
        rec["error"] = None
        rec = await self._io(self.store.create_stream, rec)
        sid = rec["id"]
        self.ingest[sid] = actors.start_ingest(self._ingest_name(sid), sid, rec, self.workers[rec["worker"]],
                                               self.cfg, self.store_ref)
        return await self.get_stream(sid)

    async def list_streams(self) -> list[dict]:
        await self._reattach()
        recs = await self._io(self.store.list_streams)
        out = await asyncio.gather(*(self._status(r) for r in recs), return_exceptions=True)
        return [s for s in out if isinstance(s, dict)]

    async def get_stream(self, stream_id: str) -> dict:
        return await self._status(await self._record(stream_id))

    async def _record(self, stream_id: str) -> dict:
        await self._reattach()
        if not isinstance(stream_id, str):
            raise KeyError(stream_id)
        try:
            return await self._io(self.store.get_stream, stream_id)
        except (StreamNotFound, ValueError):
            raise KeyError(stream_id) from None

    async def _call(self, ref: Any, timeout: float = 60.0) -> Any:
        try:
            return await asyncio.wait_for(ref, timeout)
        except Exception as e:
            log.warning("engine call failed: %s", e)
            return None

    async def _status(self, rec: dict) -> dict:
        sid = rec["id"]
        ing_h = self.ingest.get(sid)
        worker = self.workers[int(rec.get("worker", 0)) % len(self.workers)]
        decoder = self.decoders[int(rec.get("decoder", 0)) % len(self.decoders)]
        ing, wk, dec = await asyncio.gather(
            self._call(ing_h.stats.remote(), 10) if ing_h is not None else asyncio.sleep(0),
            self._call(worker.stats.remote(sid)), self._call(decoder.stats.remote(sid)))
        ing, wk, dec = ing or rec.get("ingest") or {}, wk or {}, dec or {}
        if ing_h is not None and ing.get("done") and rec.get("ingest"):
            self.ingest.pop(sid, None)  # the source is over and its figures are in the record
            ray.kill(ing_h, no_restart=True)
        status = ing.get("status") or rec.get("status") or "starting"
        if status == "created":
            status = "starting"
        if not ing and status in ("starting", "live", "reconnecting"):
            status, rec["error"] = "failed", "the stream's ingest actor is gone"
        if status == "ended" and not self._drained(wk, dec):
            status = "live"  # the source ended; its last windows are still on their way into the context
        dropped = sum((ing.get("dropped") or {}).values()) + sum((dec.get("dropped") or {}).values()) + sum(
            v for k, v in wk.items() if k.startswith("dropped_"))
        lag = 0.0
        if ing.get("live") and ing.get("t0") is not None:
            if status in ("ended", "failed"):
                lag = float(dec.get("lag_at_append") or 0.0)
            elif dec.get("lag_s") is not None:
                lag = float(dec["lag_s"])
            else:
                lag = time.time() - ing["t0"]
        return {
            "id": sid, "name": rec.get("name"), "source": rec["source"], "status": status,
            "error": ing.get("error", rec.get("error")), "created": rec.get("created", 0.0),
            "lag_s": round(lag, 3), "media_s": float(ing.get("media_s", 0.0)),
            "windows": int(dec.get("windows", 0)), "windows_total": int(ing.get("windows_total", 0)),
            "dropped": int(dropped), "reconnects": int(ing.get("reconnects", 0)),
            "context_tokens": int(dec.get("context_tokens", 0)),
            "tokens": {m: {"in": int(wk.get(f"{m}_in", 0)), "kept": int(wk.get(f"{m}_kept", 0))}
                       for m in ("audio", "video")},
            "settings": rec["settings"],
            "compressed_harder": int(wk.get("harder", 0)),
            "drops": {**(ing.get("dropped") or {}), **{k[8:]: v for k, v in wk.items() if k.startswith("dropped_")},
                      **{f"decoder_{k}": v for k, v in (dec.get("dropped") or {}).items()}},
        }

    @staticmethod
    def _drained(wk: dict, dec: dict) -> bool:
        if not wk or not dec:
            return False
        if wk.get("queue", 0) or wk.get("busy", 0) or wk.get("ending") or dec.get("queue", 0) or dec.get("busy"):
            return False
        return int(dec.get("handled", -1)) >= int(wk.get("last_stored", -1))

    async def delete_stream(self, stream_id: str) -> bool:
        rec = await self._record(stream_id)
        ing = self.ingest.pop(stream_id, None)
        if ing is not None:
            await self._call(ing.stop.remote(), 10)
            ray.kill(ing, no_restart=True)
        await self._io(self.store.delete_stream, stream_id)
        await asyncio.gather(self._call(self.workers[int(rec.get("worker", 0)) % len(self.workers)]
                                        .forget.remote(stream_id)),
                             self._call(self.decoders[int(rec.get("decoder", 0)) % len(self.decoders)]
                                        .forget.remote(stream_id)))
        from pipeline.metrics import get_metrics
        get_metrics().forget_stream(stream_id)
        return True

    async def ask(self, stream_id: str, question: str, max_tokens: int = 64) -> AsyncIterator[str]:
        """Text pieces of the answer, one per generated token."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question: must be a non-empty string")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
            raise ValueError(f"max_tokens: must be an integer in [1, 4096], got {max_tokens!r}")
        rec = await self._record(stream_id)
        decoder = self.decoders[int(rec.get("decoder", 0)) % len(self.decoders)]
        gen = decoder.ask.options(num_returns="streaming").remote(stream_id, question, max_tokens)
        async for ref in gen:
            yield await ref

    async def health(self) -> dict:
        names = [f"{self.cfg.name}-encoder-{i}" for i in range(len(self.workers))] + \
                [f"{self.cfg.name}-decoder-{i}" for i in range(len(self.decoders))]
        stats = await asyncio.gather(*(self._call(a.stats.remote(), 10) for a in self.workers + self.decoders))
        store_ok = await self._io(self.store.ping)
        workers = {n: (s if s else {"ok": False}) for n, s in zip(names, stats)}
        n = len(await self._io(self.store.list_streams)) if store_ok else len(self.ingest)
        return {"ok": bool(store_ok) and all(w.get("ok") for w in workers.values()), "streams": n,
                "workers": workers, "store": "redis" if self.cfg.redis_url else "memory"}

    async def windows(self, stream_id: str, start: int = 0) -> list[dict]:
        """The stored windows' metadata from index `start` (no payloads): index, media start/end,
        tokens in/kept per modality, whether it was compressed harder."""
        await self._record(stream_id)
        ws = await self._io(self.store.windows, stream_id, start)
        return [{"index": w.index, "start": w.media_start, "end": w.media_end, **w.fields} for w in ws]

    async def window_latencies(self, stream_id: str) -> list[float]:
        """Per-window end-to-end latencies of a live stream (window end -> in the decoder's context)."""
        rec = await self._record(stream_id)
        decoder = self.decoders[int(rec.get("decoder", 0)) % len(self.decoders)]
        return await decoder.latencies.remote(stream_id)

    async def shutdown(self) -> None:
        """Stop every stream's ingestion and every actor of this service (the store's data stays)."""
        for h in list(self.ingest.values()):
            try:
                ray.kill(h, no_restart=True)
            except Exception:
                pass
        self.ingest.clear()
        for h in self.workers + self.decoders:
            ray.kill(h, no_restart=True)
        if self.store_ref.handle is not None:
            ray.kill(self.store_ref.handle, no_restart=True)


def get_or_create_service(config: ServiceConfig | Mapping[str, Any] | None = None) -> Any:
    """The named service actor "<config.name>-service" in namespace "omnizip" (created if missing;
    an existing one is returned as is, whatever its config)."""
    cfg = ServiceConfig.coerce(config)
    opts: dict[str, Any] = dict(name=f"{cfg.name}-service", namespace=actors.NAMESPACE, get_if_exists=True,
                                num_cpus=0, max_restarts=-1, max_concurrency=1000)
    if cfg.detached:
        opts["lifetime"] = "detached"
    return ray.remote(StreamService).options(**opts).remote(cfg)


def shutdown_service(handle: Any, timeout_s: float = 60.0) -> None:
    """Stop a service actor's streams and actors, then the service actor itself."""
    try:
        ray.get(handle.shutdown.remote(), timeout=timeout_s)
    finally:
        ray.kill(handle, no_restart=True)

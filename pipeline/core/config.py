"""The engine's settings (``ServiceConfig``): one object built from defaults, a mapping, or the
``OMNIZIP_*`` environment, passed to every actor the engine starts."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.core.queues import BEHIND_POLICIES, QueuePolicy

__all__ = ["ServiceConfig", "parse_bool"]


_TRUE = frozenset({"1", "true", "yes", "on", "t", "y"})
_FALSE = frozenset({"0", "false", "no", "off", "f", "n", ""})


def parse_bool(raw: str, name: str) -> bool:
    """An ``OMNIZIP_*`` boolean, read one way everywhere (the engine's settings, the front door's,
    and pydantic's for the CLI accept the same words); anything else is a ValueError naming it."""
    word = str(raw).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean: use 1/true/yes/on or 0/false/no/off")


@dataclass
class ServiceConfig:
    """Engine settings; the defaults are the embedded setup (local Ray, tiny model, in-process store)."""

    model: str = "tiny"  # preset name or local checkpoint path (omnizip.models.load_model)
    device: str = "cpu"
    dtype: str | None = None
    redis_url: str | None = None  # None -> in-process store hosted in one actor
    encoder_workers: int = 1  # the encoder pool's size at least (pipeline.core.pool grows it with load)
    decoder_actors: int = 1  # the decoder pool's size at least
    max_batch: int = 8  # windows of several streams batched in one encoder call
    queue_windows: int = 8  # bounded queue per stream, in each stage
    behind_policy: str = "drop_oldest"  # or "compress_harder"
    system_prompt: str | None = None
    # --- additions to the contract (all optional) ---
    name: str = "omnizip"  # actor name prefix: "<name>-service", "<name>-decoder-0", ...
    context_tokens: int = 8192  # default rolling-context budget of a stream
    max_lag_s: float = 4.0  # a window further behind live than this is behind (policy applies)
    retention_windows: int | None = 3600  # windows kept per stream in the store
    retention_s: float | None = None  # ... and/or media seconds kept
    cpus_per_actor: float = 0.25  # encoder workers and decoders without GPUs
    gpus_per_actor: float = 0.5  # encoder workers and decoders when device is cuda and GPUs exist
    ingest_cpus: float = 0.1
    torch_threads: int | None = None  # torch threads in each model actor (None: Ray's default)
    detached: bool = True  # actors outlive their creator (a Serve replica, a driver)
    # --- the elastic pools (pipeline.core.pool): sizes between the minimum above and these ---
    max_encoder_workers: int | None = None  # None: encoder_workers (a fixed pool)
    max_decoder_actors: int | None = None  # None: decoder_actors
    streams_per_worker: int = 8  # a pool member's share of streams before the pool grows
    scale_interval_s: float = 5.0  # how often the pools' load is looked at
    scale_down_after_s: float = 60.0  # a pool shrinks after this long with a member to spare
    # --- limits (docs/security.md) ---
    max_streams: int = 64  # running streams in all
    max_streams_per_key: int = 16  # running streams of one API key (tenant)
    max_ended_per_key: int = 32  # ended/failed streams one key keeps (their windows and records); oldest go first
    ended_retention_s: float = 7 * 86400.0  # ... and at most this long after they ended
    max_context_tokens: int = 32768  # a stream's context budget at most (the model's position range)
    max_questions_per_stream: int = 2  # questions answered or waiting on one stream; more get 429
    max_probes: int = 8  # source probes running at once in all (their own threads); more get 429
    max_probes_per_key: int = 2  # source probes running at once for one API key; more get 429
    # --- watches and webhooks (pipeline.core.watches, pipeline.engine.watches, pipeline.engine.webhooks) ---
    max_watches_per_stream: int = 16  # standing questions on one stream; more get 429
    max_watches_per_key: int = 64  # ... over all streams of one API key
    watch_batch: int = 16  # due yes_no watches (of several streams) evaluated in one forward at most
    watch_events_max: int = 10000  # events kept per stream (a bounded log; SSE and pages read it)
    webhook_allow: str = ""  # "loopback": webhooks may go to this machine (tests); off by default
    webhook_hosts: str = ""  # as source_hosts, for webhook destinations (a CIDR lets a private network in)
    webhook_timeout_s: float = 10.0  # one delivery attempt: connect + response
    webhook_retry_s: float = 2.0  # first retry after this; doubling, at most webhook_retry_max_s
    webhook_retry_max_s: float = 900.0
    webhook_disable_after_s: float = 6 * 3600.0  # an endpoint failing this long is disabled
    store_buffer_windows: int = 32  # per stream, windows waiting for an unreachable store (64 s)
    decoder_memory_bytes: int | None = None  # context memory one decoder admits (KV of its streams'
    #   budgets); None: a quarter of its node's memory, or 60 % of its GPU's left after the model
    rebuild_attempts: int = 3  # a stream whose context rebuild killed its decoder this often in 10 min fails
    # --- what a source may be (pipeline.sources.policy; comma lists as in OMNIZIP_ALLOW_SOURCES) ---
    allow_sources: str = ""  # file, lavfi, device, loopback: each off unless named; "*": anything (operator CLI)
    file_roots: str = ""  # directories file sources must lie in
    source_hosts: str = ""  # host names or CIDRs network sources must match (empty: any public host);
    #   private/CGNAT/unique-local addresses pass only inside a CIDR named here (camera subnets)
    tls_verify: bool = True  # certificate checks of https fetched under the policy
    rtsp_udp: bool = False  # a client may ask for RTSP over UDP (off: TCP interleaved only)
    # --- push sources (whip:; pipeline.sources.push, pipeline.sources.webrtc) ---
    push_sources: bool = True  # clients may create push streams a publisher sends to
    webrtc_addresses: str = ""  # IPs offered as ICE host candidates (comma list); empty: the node's non-loopback ones
    webrtc_announce: str = ""  # an address announced instead of the host candidates' (1:1 NAT, a node's public IP)
    ice_servers: str = ""  # stun:/turn: URLs (comma list) offered to publishers and used by the service
    ice_username: str = ""  # TURN credentials for the turn: URLs above
    ice_credential: str = ""
    push_grace_s: float = 30.0  # a publisher that left may come back this long; then the stream ends
    push_wait_s: float = 600.0  # a push stream waits this long for its first publisher
    max_push_streams_per_key: int = 4  # running push streams of one API key

    def __post_init__(self) -> None:
        for name in ("encoder_workers", "decoder_actors", "max_batch", "queue_windows", "context_tokens",
                     "max_streams", "max_streams_per_key", "max_context_tokens", "max_questions_per_stream",
                     "store_buffer_windows", "streams_per_worker", "max_probes", "max_probes_per_key",
                     "rebuild_attempts", "max_ended_per_key", "max_push_streams_per_key"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ServiceConfig.{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.ended_retention_s, bool) or not isinstance(self.ended_retention_s, (int, float)) \
                or not self.ended_retention_s > 0:
            raise ValueError(f"ServiceConfig.ended_retention_s must be a number > 0, got {self.ended_retention_s!r}")
        from pipeline.core.watches import check_watch_settings

        check_watch_settings(self)  # ValueError naming the setting
        if self.behind_policy not in BEHIND_POLICIES:
            raise ValueError(f"ServiceConfig.behind_policy must be one of {list(BEHIND_POLICIES)}, "
                             f"got {self.behind_policy!r}")
        if self.decoder_memory_bytes is not None and (isinstance(self.decoder_memory_bytes, bool) or not
                                                      isinstance(self.decoder_memory_bytes, int) or self.decoder_memory_bytes < 1):
            raise ValueError(f"ServiceConfig.decoder_memory_bytes must be an integer >= 1 or None, "
                             f"got {self.decoder_memory_bytes!r}")
        for name, low in (("max_encoder_workers", self.encoder_workers), ("max_decoder_actors", self.decoder_actors)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueError(f"ServiceConfig.{name} must be an integer >= the pool's minimum ({low}), got {v!r}")
        if str(self.device).lower() not in ("cpu", "cuda", "auto") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"ServiceConfig.device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        for name in ("max_lag_s", "cpus_per_actor", "gpus_per_actor", "ingest_cpus", "scale_interval_s",
                     "scale_down_after_s", "push_grace_s", "push_wait_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"ServiceConfig.{name} must be a number >= 0, got {v!r}")
        self.source_policy()  # ValueError naming the OMNIZIP_* variable of a bad setting
        self.push_settings()
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
                    kw[f.name] = parse_bool(raw, f"OMNIZIP_{f.name.upper()}")
                elif isinstance(default, int) or f.name in ("retention_windows", "torch_threads", "max_encoder_workers",
                                                             "max_decoder_actors", "decoder_memory_bytes"):
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

    def __repr__(self) -> str:  # a Redis password in the URL never reaches a log
        from pipeline.redact import redact

        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if shown["redis_url"]:
            shown["redis_url"] = redact(shown["redis_url"])
        if shown["ice_credential"]:
            shown["ice_credential"] = "***"
        return f"ServiceConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def engine_hash(self) -> str:
        """8 hex digits naming this exact configuration: part of every engine actor's name, so a
        redeploy with another model or setting starts a new engine (and retires the old one)
        instead of silently reusing actors built for the old settings."""
        import hashlib
        import json

        doc = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(doc.encode()).hexdigest()[:8]

    def pool_bounds(self, kind: str) -> tuple[int, int]:
        """(least, most) members of the ``encoder`` or ``decoder`` pool."""
        low, high = ((self.encoder_workers, self.max_encoder_workers) if kind == "encoder"
                     else (self.decoder_actors, self.max_decoder_actors))
        return low, (low if high is None else high)

    def source_policy(self) -> Any:
        """The SourcePolicy every source of this engine is checked against (on create and on
        each reconnect)."""
        from pipeline.sources.policy import SourcePolicy

        if self.allow_sources.strip() == "*":
            return SourcePolicy.permissive()
        return SourcePolicy.from_env({"OMNIZIP_ALLOW_SOURCES": self.allow_sources,
                                      "OMNIZIP_FILE_ROOTS": self.file_roots,
                                      "OMNIZIP_SOURCE_HOSTS": self.source_hosts,
                                      "OMNIZIP_TLS_VERIFY": "1" if self.tls_verify else "0",
                                      "OMNIZIP_RTSP_UDP": "1" if self.rtsp_udp else "0",
                                      "OMNIZIP_PUSH_SOURCES": "1" if self.push_sources else "0"})

    def push_settings(self) -> Any:
        """How push streams are received (pipeline.sources.push_settings.PushSettings);
        ValueError naming the OMNIZIP_* variable of a bad setting."""
        from pipeline.sources.push_settings import PushSettings, parse_addresses, parse_ice_servers

        announce = parse_addresses(self.webrtc_announce, "OMNIZIP_WEBRTC_ANNOUNCE")
        if len(announce) > 1:
            raise ValueError("OMNIZIP_WEBRTC_ANNOUNCE: one address")
        return PushSettings(parse_addresses(self.webrtc_addresses, "OMNIZIP_WEBRTC_ADDRESSES"),
                            announce[0] if announce else "",
                            parse_ice_servers(self.ice_servers, self.ice_username, self.ice_credential),
                            float(self.push_grace_s), float(self.push_wait_s))

    def queue_policy(self, stage: str) -> QueuePolicy:
        """The bounded-queue policy of a stage: the encoder counts a half-full queue as behind and
        can compress harder; the decoder queues a backpressure window rather than refuse it (the
        encoder holds a file back while the decoder's backlog is full)."""
        encoder = stage == "encoder"
        return QueuePolicy(self.queue_windows, self.behind_policy, self.max_lag_s, backlog_is_behind=encoder,
                           can_compress_harder=encoder, wait_when_full=encoder)

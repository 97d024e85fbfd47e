"""Every metric's name, kind, labels and buckets, defined once (``SPECS``), and the label values
each may take. Plain data: the recorder (pipeline.metrics) and the docs' checks read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREFIX = "omnizip_"
STAGES = ("decode", "encode", "compress", "prefill")
MODALITIES = ("audio", "video")
DROP_REASONS = ("behind_live", "queue_full", "error", "unstored")  # unstored: fell out of a full store buffer
RECONNECT_COMPONENTS = ("source", "redis", "actor", "move")  # move: the engine moved the stream (not a fault)
POOLS = ("encoder", "decoder")  # the engine's elastic pools (pipeline.engine.elastic)
POOL_STATES = ("ready", "starting", "restarting")  # a pool member as the last health round saw it
PUSH_FRAME_OUTCOMES = ("decoded", "kept", "dropped")  # a pushed video frame: decoded, kept after thinning, lost
PUSH_FAILURE_STAGES = ("offer", "ice", "dtls")  # where a publisher's connection failed
WATCH_KINDS = ("yes_no", "answer")
WATCH_STATES = ("fired", "cleared")
WATCH_SKIP_REASONS = ("behind_live", "busy")  # behind_live: the window was behind; busy: live windows waited
WEBHOOK_OUTCOMES = ("delivered", "failed", "refused", "dropped")
REALTIME_EVENTS = ("session.update", "input_audio_buffer.append", "input_audio_buffer.commit",  # client events
                   "input_audio_buffer.clear", "conversation.item.create", "response.create", "response.cancel",
                   "other")  # other: unknown or unsupported types
REALTIME_SESSION_OUTCOMES = ("opened", "refused")
REALTIME_TURN_TRIGGERS = ("vad", "commit", "item")  # a spoken turn by VAD or commit, or a message item
REALTIME_RESPONSE_STATUSES = ("completed", "cancelled", "incomplete", "failed")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric. ``name`` is the base name; counters are exported with ``_total``."""

    name: str
    kind: Kind
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("omnizip_window_latency_seconds", "histogram",
               "Wall time one window spends in a pipeline stage.", ("stage",), LATENCY_BUCKETS),
    MetricSpec("omnizip_tokens_in", "counter",
               "Tokens produced by the encoders before compression.", ("stream", "modality")),
    MetricSpec("omnizip_tokens_kept", "counter",
               "Tokens kept by OmniZip and appended to the context.", ("stream", "modality")),
    MetricSpec("omnizip_compression_ratio", "gauge",
               "Tokens kept / tokens in over the stream's last window (lower = more compression).",
               ("stream",)),
    MetricSpec("omnizip_stream_lag_seconds", "gauge",
               "How far the stream's newest context window is behind live, in seconds.",
               ("stream",)),
    MetricSpec("omnizip_dropped_windows", "counter",
               "Windows dropped instead of entering the context, by reason.", ("stream", "reason")),
    MetricSpec("omnizip_reconnects", "counter",
               "Reconnections after a lost source, Redis connection or actor.",
               ("component", "stream")),
    MetricSpec("omnizip_context_tokens", "gauge",
               "Tokens in the stream's rolling decoder context.", ("stream",)),
    MetricSpec("omnizip_answer_ttft_seconds", "histogram",
               "Time from a question to its first answer token.", (), LATENCY_BUCKETS),
    MetricSpec("omnizip_answer_tokens_per_second", "histogram",
               "Answer decoding speed after the first token.", (), RATE_BUCKETS),
    MetricSpec("omnizip_queue_depth", "gauge",
               "Items waiting in a bounded queue.", ("queue",)),
    MetricSpec("omnizip_encoder_batch_size", "histogram",
               "Windows per encoder call (several streams batched).", (), BATCH_BUCKETS),
    MetricSpec("omnizip_stream_info", "gauge",
               "1 for each stream, labelled with its name: dashboards join it on `stream` "
               "(* on(stream) group_left(name)) to show names instead of ids.", ("stream", "name")),
    MetricSpec("omnizip_pool_members", "gauge",
               "Members of an elastic pool (encoder workers or decoders) by state: ready (answering), "
               "starting (not yet answered once), restarting (was up, silent within its grace).",
               ("pool", "state")),
    MetricSpec("omnizip_pool_min", "gauge",
               "The configured lower bound of an elastic pool's members.", ("pool",)),
    MetricSpec("omnizip_pool_max", "gauge",
               "The configured upper bound of an elastic pool's members.", ("pool",)),
    MetricSpec("omnizip_stream_moves", "counter",
               "Streams the engine moved from one pool member to another (a member joined, left or "
               "stayed away past its grace); the stream continues from the store.", ("pool",)),
    MetricSpec("omnizip_push_publishers", "gauge",
               "1 while a publisher is connected to a push stream (WebRTC/WHIP), else 0.", ("stream",)),
    MetricSpec("omnizip_push_packets", "counter",
               "Packets a push stream's publisher sent (RTP, RTCP, DTLS over its transport).", ("stream",)),
    MetricSpec("omnizip_push_bytes", "counter",
               "Bytes a push stream's publisher sent over its transport.", ("stream",)),
    MetricSpec("omnizip_push_packets_lost", "counter",
               "RTP packets of a push stream lost on the way (sequence gaps).", ("stream",)),
    MetricSpec("omnizip_push_frames", "counter",
               "Pushed video frames by outcome: decoded, kept (after thinning to the window's needs), "
               "dropped (the ingest fell behind).", ("stream", "outcome")),
    MetricSpec("omnizip_push_failures", "counter",
               "Publisher connections that failed, by stage: offer (refused), ice, dtls.", ("stage",)),
    # watches and webhooks (pipeline.engine.watches, pipeline.engine.watch_service)
    MetricSpec("omnizip_watch_evaluations", "counter", "Watch evaluations run, by kind (yes_no, answer).", ("kind",)),
    MetricSpec("omnizip_watch_events", "counter", "Watch events raised, by state (fired, cleared).", ("state",)),
    MetricSpec("omnizip_watch_skipped", "counter", "Watch evaluations skipped so windows keep up with live, "
               "by reason (behind_live: the window was behind; busy: live windows waited).", ("reason",)),
    MetricSpec("omnizip_watch_evaluation_seconds", "histogram", "Wall time of one watch evaluation call "
               "(a batched yes_no forward over several streams, or one answer).", ("kind",), LATENCY_BUCKETS),
    MetricSpec("omnizip_webhook_deliveries", "counter", "Webhook delivery attempts by outcome: delivered, "
               "failed (retried with backoff), refused (the host policy), dropped (watch gone or disabled).",
               ("outcome",)),
    MetricSpec("omnizip_webhook_pending", "gauge", "Webhook deliveries waiting in the outboxes."),
    # realtime sessions (pipeline.api.realtime)
    MetricSpec("omnizip_realtime_sessions", "counter", "Realtime WebSocket sessions by outcome: opened, refused "
               "(credentials at the handshake, or the key's limits).", ("outcome",)),
    MetricSpec("omnizip_realtime_events", "counter", "Realtime client events received, by type.", ("type",)),
    MetricSpec("omnizip_realtime_turns", "counter", "User turns: spoken ones ended by server VAD or a commit, "
               "and message items with text or audio.", ("trigger",)),
    MetricSpec("omnizip_realtime_responses", "counter", "Realtime responses by final status.", ("status",)),
    MetricSpec("omnizip_realtime_first_delta_seconds", "histogram", "From a turn's end (speech stopped, or "
               "response.create) to its first text delta.", (), LATENCY_BUCKETS),
)
_BY_NAME = {s.name: s for s in SPECS}


def exported_names() -> list[str]:
    """The sample names Prometheus holds (after the scrape config's renaming)."""
    out = []
    for s in SPECS:
        if s.kind == "counter":
            out.append(s.name + "_total")
        elif s.kind == "histogram":
            out += [s.name + "_bucket", s.name + "_sum", s.name + "_count"]
        else:
            out.append(s.name)
    return out


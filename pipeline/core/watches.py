"""Watches: standing questions a stream's decoder asks after its windows, as plain data and pure
decisions (no Ray, torch or I/O), so the HTTP layer, the service and the decoder share one
validation and every fire/clear decision is testable with a given ``now``.

- ``WatchSpec``: the one validation of a create-watch request (the HTTP body is this model, so a
  bad field is a 422 naming it; ``WatchSpec.parse`` gives the engine the same checks).
- ``WatchState``: what a watch remembers between evaluations (fired or clear, the run of
  evaluations pointing the other way, when it last fired, its last answer).
- ``decide``: one evaluation's outcome -> the new state and the transition to report, if any,
  with hysteresis (``fire`` evaluations in a row to fire, ``clear`` to clear) and a cooldown.
- ``is_due``: whether a window is one a watch evaluates (every ``every_s`` of media, whole windows).
"""

from __future__ import annotations

import dataclasses
import secrets
import urllib.parse
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from pipeline.core.records import Strict
from pipeline.redact import has_control_chars

__all__ = ["WINDOW_S", "MAX_ANSWER_TOKENS", "Hysteresis", "WatchSpec", "WatchState", "Webhook", "Transition",
           "check_watch_settings", "decide", "is_due", "new_watch_id", "new_secret", "event_body", "webhook_url_problem"]

WINDOW_S = 2.0  # media seconds of one window: every_s is a whole number of them
MAX_ANSWER_TOKENS = 32  # an `answer` watch's greedy answer is at most this long
MAX_QUESTION_CHARS = 1000
MAX_URL_CHARS = 2048


class Hysteresis(Strict):
    """Evaluations in a row that must agree before the watch changes state."""

    fire: int = Field(1, ge=1, le=1000, description="evaluations in a row above the threshold to fire")
    clear: int = Field(1, ge=1, le=1000, description="evaluations in a row below it to clear")


class Webhook(Strict):
    """Where the watch's events are POSTed (Standard Webhooks, signed with the watch's secret)."""

    url: str = Field(min_length=1, max_length=MAX_URL_CHARS, description="http(s) URL, no credentials")

    @field_validator("url")
    @classmethod
    def _form(cls, v: str) -> str:
        problem = webhook_url_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v.strip()


def webhook_url_problem(url: str) -> str | None:
    """What makes ``url`` unusable as a webhook whatever the host policy says (None: nothing).
    The host itself is judged by the engine's policy (pipeline.engine.webhooks), on every
    resolved address, at creation and at every delivery."""
    if has_control_chars(url) or not url.strip():
        return "must be a non-blank URL without control characters"
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as e:
        return f"malformed URL ({e})"
    if parts.scheme.lower() not in ("http", "https"):
        return f"scheme must be http or https, got {parts.scheme!r}"
    if not parts.hostname:
        return "the URL names no host"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return "credentials in the URL are not allowed (the payload is signed with the watch's secret instead)"
    return None


class WatchSpec(Strict):
    """A standing question about a stream (``POST /v1/streams/{id}/watches``)."""

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS, description="asked after each due window")
    kind: Literal["yes_no", "answer"] = Field("yes_no", description="yes_no: fires when p(yes) against p(no) "
                                              "crosses threshold; answer: a short greedy answer, fires when it changes")
    every_s: float = Field(WINDOW_S, gt=0, le=86400, description="media seconds between evaluations: whole windows")
    threshold: float = Field(0.5, gt=0, lt=1, description="yes_no: fires at p_yes >= threshold")
    hysteresis: Hysteresis = Field(default_factory=Hysteresis)
    cooldown_s: float = Field(0.0, ge=0, le=7 * 86400, description="no second fire within this many seconds")
    max_tokens: int = Field(16, ge=1, le=MAX_ANSWER_TOKENS, description="answer: tokens at most")
    name: str | None = Field(None, min_length=1, max_length=128)
    webhook: Webhook | None = None

    @field_validator("question")
    @classmethod
    def _clean_question(cls, v: str) -> str:
        if has_control_chars(v.replace("\n", " ")):
            raise ValueError("must not contain control characters")
        if not v.strip():
            raise ValueError("must not be blank")
        return v.strip()

    @field_validator("every_s")
    @classmethod
    def _whole_windows(cls, v: float) -> float:
        n = v / WINDOW_S
        if abs(n - round(n)) > 1e-9 or round(n) < 1:
            raise ValueError(f"must be a whole number of {WINDOW_S:g}-s windows (2, 4, 6, ...), got {v:g}")
        return float(round(n) * WINDOW_S)

    @property
    def every_windows(self) -> int:
        return int(round(self.every_s / WINDOW_S))



@dataclass
class WatchState:
    """What a watch remembers between evaluations (kept with the watch in the store)."""

    state: Literal["clear", "fired"] = "clear"
    streak: int = 0  # evaluations in a row pointing away from `state` (or at `candidate`)
    last_fired: float | None = None  # wall time
    last_answer: str | None = None  # answer kind: the answer last reported
    candidate: str | None = None  # answer kind: a new answer seen `streak` times in a row
    last_index: int | None = None  # the window last evaluated
    evaluations: int = 0
    skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "WatchState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})


@dataclass(frozen=True)
class Transition:
    """A change a watch reports as an event: ``fired`` (with p_yes or the answer) or ``cleared``."""

    state: Literal["fired", "cleared"]
    p_yes: float | None = None
    answer: str | None = None


def is_due(spec: WatchSpec, state: WatchState, index: int) -> bool:
    """Window ``index`` is evaluated when ``every_s`` of media (whole windows) passed since the
    window last evaluated: a window skipped or dropped moves the next evaluation, not its phase."""
    return state.last_index is None or index - state.last_index >= spec.every_windows


def _cooled(spec: WatchSpec, state: WatchState, now: float) -> bool:
    return state.last_fired is None or now - state.last_fired >= spec.cooldown_s


def decide(spec: WatchSpec, state: WatchState, index: int, now: float, *, p_yes: float | None = None,
           answer: str | None = None) -> tuple[WatchState, Transition | None]:
    """The state after evaluating window ``index`` at wall time ``now`` and what to report.

    yes_no: a hit is p_yes >= threshold; clear -> fired after ``hysteresis.fire`` hits in a row
    (not within ``cooldown_s`` of the last fire: the run is kept and fires once it is over);
    fired -> clear after ``hysteresis.clear`` misses in a row. answer: fires when an answer other
    than the last reported one is seen ``hysteresis.fire`` times in a row (the first answer is a
    change from nothing); an answer watch never clears."""
    s = dataclasses.replace(state, last_index=index, evaluations=state.evaluations + 1)
    if spec.kind == "yes_no":
        if p_yes is None:
            raise ValueError("a yes_no evaluation needs p_yes")
        hit = p_yes >= spec.threshold
        if s.state == "clear":
            s.streak = s.streak + 1 if hit else 0
            if s.streak >= spec.hysteresis.fire and _cooled(spec, s, now):
                s.state, s.streak, s.last_fired = "fired", 0, now
                return s, Transition("fired", p_yes=p_yes)
        else:
            s.streak = s.streak + 1 if not hit else 0
            if s.streak >= spec.hysteresis.clear:
                s.state, s.streak = "clear", 0
                return s, Transition("cleared", p_yes=p_yes)
        return s, None
    if answer is None:
        raise ValueError("an answer evaluation needs the answer")
    text = answer.strip()
    if text == s.last_answer:
        s.candidate, s.streak = None, 0
        return s, None
    s.streak = s.streak + 1 if text == s.candidate else 1
    s.candidate = text
    if s.streak >= spec.hysteresis.fire and _cooled(spec, s, now):
        s.state, s.last_answer, s.candidate, s.streak, s.last_fired = "fired", text, None, 0, now
        return s, Transition("fired", answer=text)
    return s, None


def new_watch_id() -> str:
    return "w" + secrets.token_hex(8)


def new_secret() -> str:
    """A Standard Webhooks signing secret: ``whsec_`` + base64 of 24 random bytes."""
    import base64

    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def event_body(stream_id: str, watch_id: str, index: int, media_start: float, media_end: float,
               t: Transition, now: float) -> dict[str, Any]:
    """An event as stored, streamed (SSE ``data:``) and POSTed (the webhook body); the store adds
    its ``id``. ``picture`` is the window's frames as the API serves them."""
    body: dict[str, Any] = {"stream": stream_id, "watch": watch_id, "window": int(index),
                            "start": float(media_start), "end": float(media_end), "state": t.state,
                            "time": now, "picture": f"/v1/streams/{stream_id}/windows/{int(index)}/frames.png"}
    if t.p_yes is not None:
        body["p_yes"] = round(float(t.p_yes), 6)
    if t.answer is not None:
        body["answer"] = t.answer
    return body


def check_watch_settings(cfg: Any) -> None:
    """The engine's watch and webhook settings (pipeline.core.config.ServiceConfig); ValueError
    naming the bad one."""
    for name in ("max_watches_per_stream", "max_watches_per_key", "watch_batch", "watch_events_max"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"ServiceConfig.{name} must be an integer >= 1, got {v!r}")
    for name in ("webhook_timeout_s", "webhook_retry_s", "webhook_retry_max_s", "webhook_disable_after_s"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"ServiceConfig.{name} must be a number > 0, got {v!r}")
    allow = {a.strip().lower() for a in str(cfg.webhook_allow).split(",") if a.strip()}
    if allow - {"loopback"}:
        raise ValueError(f"OMNIZIP_WEBHOOK_ALLOW: only 'loopback' may be named, got {sorted(allow - {'loopback'})}")

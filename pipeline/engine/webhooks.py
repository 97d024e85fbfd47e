"""Webhook delivery per Standard Webhooks (https://www.standardwebhooks.com/), signed with the
``standardwebhooks`` library: each event of a watch with a webhook waits in its stream's outbox
(pipeline.store.watch_store) until its endpoint answers 2xx.

- **At least once, in order per watch**: only the oldest pending event of a watch is tried; a
  later one waits until it is delivered. Every attempt carries the same ``webhook-id`` (the
  event id) with a fresh ``webhook-timestamp`` and signature, so a receiver de-duplicates by id.
- **Backoff**: after a failed attempt the watch waits ``retry_s`` doubling per failure, at most
  ``retry_max_s``; an endpoint failing for ``disable_after_s`` (hours by default) is disabled:
  its pending events are dropped, counted, and the watch's ``webhook.status`` says ``disabled``.
- **Restarts**: the outbox and each watch's delivery state are in the store, so a restarted
  service (the deliverer runs in it) picks up where the last one stopped.
- **The destination** is judged by the source host policy (pipeline.sources.policy) built from
  the webhook settings, on every resolved address, at creation and again at every attempt; the
  connection goes to the judged addresses only (no DNS rebinding), redirects are never followed
  (a 3xx is a failure), no credentials in the URL, and at most ``MAX_RESPONSE_BYTES`` of a
  response are read.
"""

from __future__ import annotations

import datetime
import http.client
import json
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any

from pipeline.core.watches import webhook_url_problem
from pipeline.errors import SourceRefused

__all__ = ["Attempt", "DeliveryPolicy", "MAX_RESPONSE_BYTES", "WebhookRefused", "due", "judge", "next_delivery_state",
           "post_event", "webhook_policy"]

MAX_RESPONSE_BYTES = 4096
USER_AGENT = "omnizip-stream-webhooks/1"


class WebhookRefused(ValueError):
    """A webhook destination the policy refuses (400 naming the rule; ``param`` the field)."""

    param = "webhook.url"

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"webhook.url refused ({rule}): {detail}")
        self.rule, self.detail = rule, detail

    def __reduce__(self) -> tuple:  # crosses Ray with its own arguments
        return (type(self), (self.rule, self.detail))


def webhook_policy(cfg: Any) -> Any:
    """The host policy of webhook destinations: the source policy's address rules (no loopback,
    link-local, private or reserved addresses) with the operator's own exceptions
    (OMNIZIP_WEBHOOK_ALLOW=loopback, OMNIZIP_WEBHOOK_HOSTS as OMNIZIP_SOURCE_HOSTS)."""
    from pipeline.sources.policy import SourcePolicy

    allow = {a.strip().lower() for a in str(cfg.webhook_allow).split(",") if a.strip()}
    hosts = tuple(h.strip() for h in str(cfg.webhook_hosts).split(",") if h.strip())
    return SourcePolicy(allow=frozenset(allow), hosts=hosts)


def judge(policy: Any, url: str) -> Any:
    """Where a webhook may be POSTed (a NetworkTarget, every resolved address judged);
    WebhookRefused naming the rule otherwise. Opens nothing."""
    problem = webhook_url_problem(url)
    if problem is not None:
        rule = "url:credentials" if "credentials" in problem else "scheme" if "scheme" in problem else "url:invalid"
        raise WebhookRefused(rule, problem)
    try:
        return policy.check_network(url.strip())
    except SourceRefused as e:
        raise WebhookRefused(e.rule, e._detail) from None


class _Pinned(http.client.HTTPConnection):
    """HTTP to the judged addresses only, never to a fresh lookup."""

    def __init__(self, target: Any, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.addresses = target.addresses

    def _sock(self) -> socket.socket:
        err: OSError | None = None
        for a in self.addresses:
            try:
                return socket.create_connection((a, self.port), self.timeout)
            except OSError as e:
                err = e
        raise err or OSError("no address to connect to")

    def connect(self) -> None:
        self.sock = self._sock()


class _PinnedTLS(_Pinned):
    """HTTPS to the judged addresses, the certificate checked against the URL's host."""

    def connect(self) -> None:
        self.sock = ssl.create_default_context().wrap_socket(self._sock(), server_hostname=self.host)


@dataclass(frozen=True)
class Attempt:
    """One POST's outcome: ``ok`` (2xx), the status (None: no answer) and a short reason."""

    ok: bool
    status: int | None
    error: str | None = None


def post_event(policy: Any, url: str, secret: str, event: dict[str, Any], timeout_s: float) -> Attempt:
    """One signed POST of ``event`` (its JSON is the body; ``event["id"]`` the webhook-id).
    Judged again first (DNS may have changed since creation); never follows a redirect."""
    from standardwebhooks import Webhook

    try:
        target = judge(policy, url)
    except WebhookRefused as e:
        return Attempt(False, None, f"refused ({e.rule})")
    body = json.dumps(event, separators=(",", ":")).encode()
    now = datetime.datetime.now(tz=datetime.timezone.utc)
    headers = {"content-type": "application/json", "user-agent": USER_AGENT, "webhook-id": event["id"],
               "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": Webhook(secret).sign(event["id"], now, body)}
    parts = urllib.parse.urlsplit(url.strip())
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = (_PinnedTLS if target.scheme == "https" else _Pinned)(target, timeout_s)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read(MAX_RESPONSE_BYTES)  # a bounded look at the answer; the rest is never read
        status = resp.status
    except (OSError, http.client.HTTPException) as e:
        return Attempt(False, None, f"{type(e).__name__}")
    finally:
        conn.close()
    if 200 <= status < 300:
        return Attempt(True, status)
    return Attempt(False, status, "redirect not followed" if 300 <= status < 400 else f"HTTP {status}")


@dataclass(frozen=True)
class DeliveryPolicy:
    """How failures are retried and when an endpoint is given up."""

    retry_s: float = 2.0
    retry_max_s: float = 900.0
    disable_after_s: float = 6 * 3600.0


def next_delivery_state(state: dict[str, Any], attempt: Attempt, now: float, p: DeliveryPolicy) -> dict[str, Any]:
    """A watch's delivery state after ``attempt`` at ``now`` (pure): a success resets the
    failures; a failure schedules the next try (exponential backoff) and, once the endpoint has
    failed for ``disable_after_s``, disables it."""
    s = {"status": "active", "attempts": 0, "delivered": 0, "failed": 0, "next_at": 0.0, "failing_since": None,
         "last_error": None, "last_status": None, **state}
    s["last_status"] = attempt.status
    if attempt.ok:
        s.update(attempts=0, next_at=0.0, failing_since=None, delivered=int(s["delivered"]) + 1)
        return s
    attempts = int(s["attempts"]) + 1
    since = s["failing_since"] if s["failing_since"] is not None else now
    s.update(attempts=attempts, failed=int(s["failed"]) + 1, failing_since=since, last_error=attempt.error,
             next_at=now + min(p.retry_max_s, p.retry_s * 2 ** (attempts - 1)))
    if now - since >= p.disable_after_s:
        s["status"] = "disabled"
    return s


def due(state: dict[str, Any], now: float) -> bool:
    """Whether a watch's endpoint may be tried at ``now`` (active, its backoff over)."""
    return state.get("status", "active") == "active" and float(state.get("next_at") or 0.0) <= now

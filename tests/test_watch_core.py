"""Watches as plain data: the spec's validation (the 422s name the field), the fire/clear
decisions with hysteresis and cooldown at a given `now`, and the webhook retry schedule."""

from __future__ import annotations

import pytest

from pipeline.core.watches import WatchSpec, WatchState, decide, event_body, is_due
from pipeline.engine.webhooks import Attempt, DeliveryPolicy, next_delivery_state


@pytest.mark.parametrize("spec, field", [
    ({"question": ""}, "question"), ({"question": "   "}, "question"), ({"question": "x" * 1001}, "question"),
    ({"question": "q", "every_s": 3}, "every_s"), ({"question": "q", "every_s": 0}, "every_s"),
    ({"question": "q", "threshold": 0}, "threshold"), ({"question": "q", "threshold": 1}, "threshold"),
    ({"question": "q", "hysteresis": {"fire": 0}}, "hysteresis.fire"),
    ({"question": "q", "hysteresis": {"clear": 0}}, "hysteresis.clear"),
    ({"question": "q", "kind": "maybe"}, "kind"), ({"question": "q", "max_tokens": 33}, "max_tokens"),
    ({"question": "q", "webhook": {"url": "https://u:p@example.com/h"}}, "webhook.url"),
    ({"question": "q", "webhook": {"url": "ftp://example.com/h"}}, "webhook.url"),
    ({"question": "q", "colour": 1}, "colour"),
])
def test_bad_specs_name_the_field(spec: dict, field: str) -> None:
    with pytest.raises(ValueError) as e:
        WatchSpec.parse(spec)
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_every_s_is_whole_windows() -> None:
    s = WatchSpec.parse({"question": "Is the door open?", "every_s": 6})
    assert s.every_windows == 3
    st = WatchState()
    assert is_due(s, st, 0)
    st.last_index = 4
    assert not is_due(s, st, 6) and is_due(s, st, 7)


def test_yes_no_hysteresis_fire_and_clear() -> None:
    s = WatchSpec.parse({"question": "q", "threshold": 0.6, "hysteresis": {"fire": 2, "clear": 3}})
    st, out = WatchState(), []
    for i, p in enumerate([0.7, 0.5, 0.7, 0.9, 0.8, 0.1, 0.2, 0.9, 0.1, 0.1, 0.1]):
        st, t = decide(s, st, i, 100.0 + i, p_yes=p)
        out.append(t.state if t else None)
    # two hits in a row fire (a miss resets the run), three misses in a row clear
    assert out == [None, None, None, "fired", None, None, None, None, None, None, "cleared"]
    assert st.state == "clear" and st.evaluations == 11 and st.last_index == 10


def test_cooldown_holds_the_next_fire() -> None:
    s = WatchSpec.parse({"question": "q", "threshold": 0.5, "cooldown_s": 60})
    st, t = decide(s, WatchState(), 0, 1000.0, p_yes=0.9)
    assert t is not None and t.state == "fired" and t.p_yes == 0.9
    st, t = decide(s, st, 1, 1001.0, p_yes=0.1)
    assert t is not None and t.state == "cleared"
    st, t = decide(s, st, 2, 1030.0, p_yes=0.9)
    assert t is None  # within the cooldown: the run is kept ...
    st, t = decide(s, st, 3, 1061.0, p_yes=0.9)
    assert t is not None and t.state == "fired"  # ... and fires once it is over


def test_answer_fires_when_it_changes() -> None:
    s = WatchSpec.parse({"question": "Who speaks?", "kind": "answer", "hysteresis": {"fire": 2}})
    st, got = WatchState(), []
    for i, a in enumerate(["Ann", "Ann", "Ann", "Bob", "Ann", "Bob", "Bob", "Bob"]):
        st, t = decide(s, st, i, float(i), answer=a)
        got.append(t.answer if t else None)
    assert got == [None, "Ann", None, None, None, None, "Bob", None]


def test_event_body_carries_what_outside_checks_read() -> None:
    s = WatchSpec.parse({"question": "q"})
    st, t = decide(s, WatchState(), 7, 5.0, p_yes=0.75)
    body = event_body("s1", "w1", 7, 14.0, 16.0, t, 5.0)
    assert body["watch"] == "w1" and body["window"] == 7 and body["state"] == "fired" and body["p_yes"] == 0.75
    assert body["picture"] == "/v1/streams/s1/windows/7/frames.png" and (body["start"], body["end"]) == (14.0, 16.0)


def test_backoff_doubles_then_disables() -> None:
    p = DeliveryPolicy(retry_s=2.0, retry_max_s=10.0, disable_after_s=100.0)
    fail = Attempt(False, 503, "HTTP 503")
    s = next_delivery_state({}, fail, 0.0, p)
    assert s["next_at"] == 2.0 and s["attempts"] == 1 and s["status"] == "active"
    s = next_delivery_state(s, fail, 2.0, p)
    assert s["next_at"] == 6.0
    s = next_delivery_state(s, fail, 6.0, p)
    s = next_delivery_state(s, fail, 14.0, p)
    assert s["next_at"] == 24.0  # capped at retry_max_s
    s = next_delivery_state(s, Attempt(True, 204), 24.0, p)
    assert s["attempts"] == 0 and s["failing_since"] is None and s["delivered"] == 1
    s = next_delivery_state(s, fail, 30.0, p)
    s = next_delivery_state(s, fail, 131.0, p)
    assert s["status"] == "disabled" and s["failing_since"] == 30.0 and s["last_error"] == "HTTP 503"

"""The engine's scheduler (pipeline.core.queues) on its own: every queue policy in milliseconds, with
no Ray, no model and no clock but the one the test passes."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from pipeline.core.queues import Added, QueuePolicy, StreamQueues


@dataclass
class W:
    """A window as the scheduler sees it: lag = now - (t0 + end) for live ones."""

    stream_id: str
    index: int
    backpressure: bool = False
    t0: float | None = None

    def lag(self, now: float) -> float | None:
        return None if self.t0 is None else now - (self.t0 + 2.0 * (self.index + 1))


def queues(**policy: object) -> tuple[StreamQueues[W], list[tuple[str, int, str]]]:
    drops: list[tuple[str, int, str]] = []
    q: StreamQueues[W] = StreamQueues(QueuePolicy(**policy), on_drop=lambda s, i, r: drops.append((s, i, r)))
    return q, drops


def indices(taken: list) -> list[tuple[str, int]]:
    return [(t.window.stream_id, t.window.index) for t in taken]


def test_importing_the_scheduler_loads_neither_ray_nor_torch() -> None:
    code = "import sys, pipeline.core.queues; print(sorted({'ray', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_full_queue_drops_its_oldest_window_and_counts_it() -> None:
    q, drops = queues(capacity=2)
    q.open("a")
    assert [q.add(W("a", i)) for i in range(4)] == [Added.OK] * 4
    assert q.depth("a") == 2 and drops == [("a", 0, "queue_full"), ("a", 1, "queue_full")]
    assert q.drops("a") == {"queue_full": 2}
    assert indices(q.take(10, now=0.0)) == [("a", 2), ("a", 3)]
    assert q.peak("a") == 2


def test_backpressure_window_waits_instead_of_dropping() -> None:
    q, drops = queues(capacity=2)
    q.open("f")
    assert [q.add(W("f", i, backpressure=True)) for i in range(3)] == [Added.OK, Added.OK, Added.FULL]
    assert drops == [] and q.depth("f") == 2
    q.take(1, now=0.0)
    assert q.add(W("f", 2, backpressure=True)) == Added.OK


def test_a_stage_that_cannot_refuse_queues_backpressure_past_capacity() -> None:
    q, drops = queues(capacity=1, wait_when_full=False)
    q.open("f")
    assert [q.add(W("f", i, backpressure=True)) for i in range(3)] == [Added.OK] * 3
    assert q.depth("f") == 3 and drops == []


def test_retries_and_late_duplicates_are_not_queued_twice() -> None:
    q, drops = queues(capacity=4)
    q.open("a")
    assert q.add(W("a", 0)) == Added.OK
    assert q.add(W("a", 0)) == Added.DUPLICATE  # queued
    q.take(1, now=0.0)
    assert q.add(W("a", 0)) == Added.DUPLICATE  # taken, in flight
    q.finish("a")
    assert q.add(W("a", 0)) == Added.DUPLICATE  # done
    q.add(W("a", 1)), q.add(W("a", 2)), q.add(W("a", 3)), q.add(W("a", 4)), q.add(W("a", 5))
    assert q.add(W("a", 1)) == Added.DUPLICATE  # dropped (queue_full) counts as done too
    assert drops == [("a", 1, "queue_full")]


def test_out_of_order_arrival_is_queued_in_index_order() -> None:
    q, _ = queues(capacity=8)
    q.open("a")
    for i in (0, 3, 1, 2):
        q.add(W("a", i))
    assert indices(q.take(8, now=0.0)) == [("a", i) for i in range(4)]


def test_resumed_stream_treats_done_windows_as_retries() -> None:
    q, _ = queues()
    q.open("a", done_through=4)
    assert q.add(W("a", 4)) == Added.DUPLICATE and q.add(W("a", 5)) == Added.OK
    q.open("a", done_through=99)  # opening again changes nothing
    assert q.add(W("a", 6)) == Added.OK


def test_round_robin_over_streams_and_rotation_between_takes() -> None:
    q, _ = queues(capacity=8)
    for s in "abc":
        q.open(s)
        for i in range(3):
            q.add(W(s, i))
    assert indices(q.take(4, now=0.0)) == [("a", 0), ("b", 0), ("c", 0), ("a", 1)]
    # the next take starts after the stream served first last time
    assert indices(q.take(1, now=0.0)) == [("b", 1)]
    assert indices(q.take(1, now=0.0)) == [("c", 1)]
    assert indices(q.take(9, now=0.0)) == [("a", 2), ("b", 2), ("c", 2)]
    assert not q.has_work()


def test_behind_live_windows_are_dropped_only_while_newer_ones_wait() -> None:
    q, drops = queues(capacity=8, max_lag_s=4.0)
    q.open("cam")
    for i in range(3):
        q.add(W("cam", i, t0=0.0))  # window i ends at 2(i+1) s
    # at t = 10 s windows 0 and 1 lag 8 and 6 s (> 4) with newer ones behind them: dropped
    assert indices(q.take(1, now=10.0)) == [("cam", 2)]
    assert drops == [("cam", 0, "behind_live"), ("cam", 1, "behind_live")]
    q.add(W("cam", 3, t0=0.0))
    assert indices(q.take(1, now=100.0)) == [("cam", 3)]  # the newest is never dropped for lag


def test_compress_harder_flags_instead_of_dropping_where_the_stage_can() -> None:
    q, drops = queues(capacity=8, behind_policy="compress_harder", can_compress_harder=True)
    q.open("cam")
    for i in range(3):
        q.add(W("cam", i, t0=0.0))
    taken = q.take(3, now=10.0)
    assert [t.harder for t in taken] == [True, True, False] and drops == []
    # a stage that cannot compress (the decoder) keeps the window unchanged
    q2, drops2 = queues(capacity=8, behind_policy="compress_harder", can_compress_harder=False)
    q2.open("cam")
    for i in range(3):
        q2.add(W("cam", i, t0=0.0))
    assert [t.harder for t in q2.take(3, now=10.0)] == [False] * 3 and drops2 == []


def test_half_full_queue_counts_as_behind_for_the_encoder() -> None:
    q, drops = queues(capacity=4, backlog_is_behind=True)
    q.open("file")
    for i in range(4):
        q.add(W("file", i))  # unpaced: no lag at all
    assert indices(q.take(1, now=0.0)) == [("file", 2)]
    assert drops == [("file", 0, "behind_live"), ("file", 1, "behind_live")]


def test_backpressure_windows_are_never_behind() -> None:
    q, drops = queues(capacity=4, backlog_is_behind=True, max_lag_s=0.0)
    q.open("f")
    for i in range(4):
        q.add(W("f", i, backpressure=True, t0=0.0))
    assert [t.harder for t in q.take(4, now=1e6)] == [False] * 4 and drops == []


def test_in_flight_backlog_and_finish() -> None:
    q, _ = queues(capacity=4)
    q.open("a")
    for i in range(3):
        q.add(W("a", i))
    q.take(2, now=0.0)
    assert (q.depth("a"), q.in_flight("a"), q.backlog("a")) == (1, 2, 3)
    q.finish("a", 2)
    assert (q.in_flight("a"), q.backlog("a")) == (0, 1)


def test_forgotten_stream_refuses_windows_and_can_be_reopened() -> None:
    q, drops = queues()
    q.open("a")
    q.add(W("a", 0))
    assert q.forget("a") and not q.is_open("a") and q.was_forgotten("a")
    assert q.add(W("a", 1)) == Added.UNKNOWN and drops == []
    assert q.add(W("never", 0)) == Added.UNKNOWN
    q.open("a")
    assert not q.was_forgotten("a") and q.add(W("a", 1)) == Added.OK


def test_drops_outside_the_queue_and_restored_counts() -> None:
    q, drops = queues()
    q.open("a")
    q.restore_drops("a", {"error": 2})
    q.drop("a", 7, "error")
    assert q.drops("a") == {"error": 3} and drops == [("a", 7, "error")]
    assert q.add(W("a", 7)) == Added.DUPLICATE


@pytest.mark.parametrize("bad", [dict(capacity=0), dict(capacity=True), dict(behind_policy="nope"),
                                 dict(max_lag_s=-1.0), dict(max_lag_s=float("nan"))])
def test_bad_policy_is_refused_naming_the_field(bad: dict) -> None:
    with pytest.raises(ValueError, match="QueuePolicy." + next(iter(bad))):
        QueuePolicy(**bad)

"""pipeline.core.pool: the elastic pools' decisions, without Ray."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from pipeline.core.pool import Bounds, Member, Move, least_loaded, pressed, rebalance, target_size

B = Bounds(low=1, high=4, per_member=2, queue_limit=4, max_lag_s=4.0)


def members(n: int, ready: bool = True, **load: float) -> list[Member]:
    return [Member(i, ready, **load) for i in range(n)]  # type: ignore[arg-type]


def test_pool_follows_the_stream_count_within_its_bounds() -> None:
    assert target_size(B, members(1), 0) == 1  # never below low
    assert target_size(B, members(1), 2) == 1
    assert target_size(B, members(1), 3) == 2  # a third stream needs a second member
    assert target_size(B, members(2), 3) == 2
    assert target_size(B, members(2), 2) == 1  # one to spare: the caller shrinks after a calm period
    assert target_size(B, members(4), 100) == 4  # never above high


def test_pool_grows_one_member_at_a_time_and_not_past_members_still_starting() -> None:
    assert target_size(B, members(1), 8) == 2  # 4 asked for, one more than the members that are up
    starting = members(1) + [Member(1, False)]
    assert target_size(B, starting, 8) == 2  # the new one is not up yet: no third
    assert target_size(B, members(2), 8) == 3


def test_pressure_asks_for_one_more_member_only_when_every_member_is_up() -> None:
    assert pressed(Member(0, True, queue=4), B) and pressed(Member(0, True, lag_s=4.5), B)
    assert not pressed(Member(0, True, queue=3, lag_s=4.0), B) and not pressed(Member(0, False, queue=9), B)
    assert target_size(B, [Member(0, True, queue=5)], 1) == 2
    assert target_size(B, [Member(0, True, queue=5), Member(1, False)], 1) == 2  # no third while one starts
    assert target_size(B, [Member(i, True, lag_s=9.0) for i in range(4)], 1) == 4  # high is high


def test_bounds_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        Bounds(2, 1, 1, 1, 1.0)
    with pytest.raises(ValueError):
        Bounds(0, 1, 1, 1, 1.0)


def test_least_loaded_member() -> None:
    assert least_loaded([0, 0, 1], [0, 1, 2]) == 2
    assert least_loaded([0, 1], [0, 1]) == 0  # the lowest index on a tie
    assert least_loaded([5, 5, 0], [0, 1]) == 1  # streams on members not in the pool do not count
    with pytest.raises(ValueError):
        least_loaded([], [])


def test_rebalance_gives_a_joining_member_its_share() -> None:
    assigned = {f"s{i}": 0 for i in range(6)}
    moves = rebalance(assigned, [0, 1])
    assert len(moves) == 3 and all(m.src == 0 and m.dst == 1 for m in moves)
    assert rebalance(_apply(assigned, moves), [0, 1]) == []  # balanced: nothing more


def test_rebalance_moves_every_stream_off_members_that_left() -> None:
    assigned = {"a": 0, "b": 1, "c": 1, "d": 2}
    moves = rebalance(assigned, [0, 2])  # member 1 left (scaled down or lost)
    after = _apply(assigned, moves)
    assert set(after.values()) <= {0, 2}
    assert {m.stream_id for m in moves} == {"b", "c"}  # the others stay where they are
    assert max(Counter(after.values()).values()) - min(Counter(after.values()).values()) <= 1


@pytest.mark.parametrize("n_streams,n_members", list(itertools.product([0, 1, 5, 13], [1, 2, 3, 5])))
def test_rebalance_always_ends_balanced_with_the_fewest_moves(n_streams: int, n_members: int) -> None:
    assigned = {f"s{i:02d}": (i * 7) % 4 for i in range(n_streams)}  # some on members that are not there
    ms = list(range(n_members))
    moves = rebalance(assigned, ms)
    after = _apply(assigned, moves)
    load = Counter({m: 0 for m in ms}) + Counter(after.values())
    assert set(after.values()) <= set(ms)
    assert max(load[m] for m in ms) - min(load[m] for m in ms) <= 1
    assert len({m.stream_id for m in moves}) == len(moves)  # no stream moves twice
    share = -(-n_streams // n_members)  # the most any member ends with
    staying = Counter(a for a in assigned.values() if a in ms)
    assert len(moves) <= sum(max(0, c - share) for c in staying.values()) + \
        sum(1 for a in assigned.values() if a not in ms) + n_members


def test_rebalance_without_members_moves_nothing() -> None:
    assert rebalance({"a": 0}, []) == []


def _apply(assigned: dict[str, int], moves: list[Move]) -> dict[str, int]:
    out = dict(assigned)
    for m in moves:
        assert out[m.stream_id] == m.src
        out[m.stream_id] = m.dst
    return out


def test_records_to_forget_bounds_each_owner_and_the_age() -> None:
    from pipeline.core.records import StreamRecord, StreamSettings, records_to_forget

    def rec(sid: str, owner: str, status: str, ended: float) -> StreamRecord:
        return StreamRecord(sid, "x", StreamSettings({}, 4096), owner=owner, status=status, created=0.0,
                            extra={"ended_at": ended})
    recs = [rec("a1", "a", "ended", 10), rec("a2", "a", "failed", 20), rec("a3", "a", "ended", 30),
            rec("a4", "a", "live", 0), rec("b1", "b", "ended", 5)]
    assert records_to_forget(recs, 2, 1e9, now=100) == ["a1"]
    assert records_to_forget(recs, 5, 80, now=100) == ["b1", "a1"]  # older than 80 s, oldest first
    assert records_to_forget(recs, 1, 1e9, now=100) == ["a1", "a2"]  # a live stream is never counted

"""The elastic pools' decisions, as pure functions (no Ray, no torch): how many encoder workers
or decoders the load asks for, which member a new stream goes to, and which streams move when a
member joins or leaves. ``pipeline.engine.elastic`` applies them to the actors.

Load is streams per member (the streams' records name their member), plus pressure: a member
whose queue is half full or whose streams fell behind live asks for one more member even below
``per_member``. A pool grows one member at a time (a new member may need a new node, which the
autoscaler takes minutes to add) and shrinks only after ``scale_down_after_s`` of calm.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Bounds", "Member", "MemoryFull", "Move", "context_bytes", "kv_bytes_per_token", "least_loaded",
           "place_by_memory", "pressed", "rebalance", "target_size"]


@dataclass(frozen=True)
class Member:
    """One pool member as the last health round saw it."""

    index: int
    ready: bool  # answered the health check (placed, model loaded)
    queue: int = 0  # windows waiting in it
    lag_s: float = 0.0  # the worst lag behind live among its recently served streams


@dataclass(frozen=True)
class Bounds:
    """A pool's limits and what counts as pressure."""

    low: int
    high: int
    per_member: int  # streams one member serves before the pool grows
    queue_limit: int  # windows queued in one member that count as pressure
    max_lag_s: float  # lag behind live that counts as pressure

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high or self.per_member < 1:
            raise ValueError(f"pool bounds need 1 <= low <= high and per_member >= 1, got {self}")


@dataclass(frozen=True)
class Move:
    """Stream ``stream_id`` goes from member ``src`` to member ``dst``."""

    stream_id: str
    src: int
    dst: int


def pressed(member: Member, bounds: Bounds) -> bool:
    """Whether a member is overloaded whatever its stream count says."""
    return member.ready and (member.queue >= bounds.queue_limit or member.lag_s > bounds.max_lag_s)


def target_size(bounds: Bounds, members: Iterable[Member], streams: int) -> int:
    """How many members the load asks for: enough for ``streams`` at ``per_member`` each, one more
    than now when every member is up and one of them is pressed, within the bounds. Never more
    than one above the members that are up (a member still starting is not doubled), and never
    fewer than now while a member is starting (it was asked for; its load is not known yet)."""
    ms = list(members)
    need = math.ceil(streams / bounds.per_member)
    ready = sum(m.ready for m in ms)
    if ms and ready == len(ms) and any(pressed(m, bounds) for m in ms):
        need = max(need, len(ms) + 1)
    if ready < len(ms):
        need = max(need, len(ms))
    if need > len(ms):
        need = min(need, ready + 1)
    return max(bounds.low, min(bounds.high, need))


def least_loaded(assigned: Iterable[int], members: Iterable[int]) -> int:
    """The member with the fewest streams (``assigned``: one member index per stream), the lowest
    index on a tie; ValueError without members."""
    ms = sorted(set(members))
    if not ms:
        raise ValueError("the pool has no member to place a stream on")
    load = Counter(a for a in assigned if a in ms)
    return min(ms, key=lambda m: (load[m], m))


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """What one context token holds in the KV cache: keys and values of every layer."""
    return int(layers) * int(kv_heads) * int(head_dim) * 2 * int(dtype_bytes)


def context_bytes(tokens: int, per_token: int) -> int:
    """The memory a context of ``tokens`` (its budget: it grows to it) takes at most."""
    return int(tokens) * int(per_token)


class MemoryFull(ValueError):
    """No decoder has room for a stream's context; the message names the need and the room."""


def place_by_memory(streams: Iterable[tuple[int, int]], members: Iterable[int], need: int,
                    budgets: Mapping[int, int | None]) -> int:
    """The member with the fewest streams among those whose context memory still holds ``need``
    bytes (``streams``: (member, bytes) per running stream; ``budgets``: each member's bytes for
    contexts, None where unknown: a member that has not reported yet is not refused).
    MemoryFull when none has room, ValueError without members."""
    ms = sorted(set(members))
    if not ms:
        raise ValueError("the pool has no member to place a stream on")
    used: Counter = Counter()
    count: Counter = Counter()
    for m, b in streams:
        used[m] += int(b)
        count[m] += 1
    fits = [m for m in ms if budgets.get(m) is None or used[m] + need <= int(budgets[m])]  # type: ignore[operator]
    if not fits:
        room = max(int(budgets[m]) - used[m] for m in ms)  # type: ignore[arg-type]
        mib = 1 << 20
        raise MemoryFull(f"no decoder has memory for this stream's context: it needs {need / mib:.1f} MiB, "
                         f"the most any decoder has left is {max(room, 0) / mib:.1f} MiB "
                         f"(of {max(int(b or 0) for b in budgets.values()) / mib:.1f} MiB); use a smaller "
                         "context_tokens, delete a stream, or give the decoders more memory "
                         "(OMNIZIP_DECODER_MEMORY_BYTES)")
    return min(fits, key=lambda m: (count[m], m))


def rebalance(assigned: Mapping[str, int], members: Iterable[int]) -> list[Move]:
    """The moves that put every stream on one of ``members`` (the ones up and staying) with
    counts at most one apart: streams of a member that left go first, then one stream at a time
    from the fullest member to the emptiest. Streams are taken newest-id-last for stability."""
    ms = sorted(set(members))
    if not ms:
        return []
    load = Counter({m: 0 for m in ms})
    where = dict(assigned)
    for a in where.values():
        if a in load:
            load[a] += 1
    moves: list[Move] = []
    for sid in sorted(where):
        if where[sid] not in load:
            dst = min(ms, key=lambda m: (load[m], m))
            moves.append(Move(sid, where[sid], dst))
            load[dst] += 1
            where[sid] = dst
    while True:
        hi = max(ms, key=lambda m: (load[m], -m))
        lo = min(ms, key=lambda m: (load[m], m))
        if load[hi] - load[lo] <= 1:
            return moves
        sid = max(s for s, a in where.items() if a == hi)
        moves.append(Move(sid, hi, lo))
        where[sid] = lo
        load[hi] -= 1
        load[lo] += 1

"""ICE under the source policy: where the service offers its host candidates, and where it may
send a connectivity check.

aiortc builds its ICE agent (aioice's ``Connection``) itself and offers no setting for either,
so :func:`install` makes aiortc build :class:`GuardedConnection` instead, a subclass that reads
the rules of the peer connection being set up from a context variable (:func:`ice_rules`,
entered around ``setRemoteDescription``; asyncio tasks inherit it). Under the rules:

* host candidates are gathered on the operator's addresses (``OMNIZIP_WEBRTC_ADDRESSES``) only,
  instead of every address of the node (aioice's choice, loopback always left out);
* a remote candidate the policy refuses (``SourcePolicy.check_peer``: loopback unless allowed,
  link-local, private outside the operator's networks, any host name) is never added, a check
  is never sent to such an address, and a connectivity check that arrives from one is not
  answered, so no peer-reflexive pair can form there either. The offer's candidates were
  already filtered (pipeline.sources.sdp); this holds for whatever reaches the agent later.

A connection made outside :func:`ice_rules` (another use of aiortc in the process) behaves as
stock aioice does.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aioice
import aioice.ice

from pipeline.errors import SourceRefused
from pipeline.sources.policy import SourcePolicy

__all__ = ["GuardedConnection", "IceRules", "ice_rules", "install"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IceRules:
    """The rules of one peer connection: ``addresses`` to gather host candidates on (empty: the
    node's own, as aioice picks them), ``policy`` that judges every remote address."""

    policy: SourcePolicy
    addresses: tuple[str, ...] = ()

    def allows(self, address: str) -> bool:
        try:
            self.policy.check_peer(address)
            return True
        except SourceRefused:
            return False


_RULES: contextvars.ContextVar[IceRules | None] = contextvars.ContextVar("omnizip_ice_rules", default=None)


@contextlib.contextmanager
def ice_rules(rules: IceRules) -> Iterator[None]:
    """Peer connections whose ICE agents are made inside this block follow ``rules``."""
    token = _RULES.set(rules)
    try:
        yield
    finally:
        _RULES.reset(token)


class GuardedConnection(aioice.Connection):
    """aioice's agent with the rules it was made under (none: stock behaviour)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rules = _RULES.get()
        self.refused = 0  # remote addresses refused: candidates, checks to send, checks received

    def _allowed(self, address: str) -> bool:
        if self.rules is None or self.rules.allows(address):
            return True
        self.refused += 1
        log.info("ICE: address %s refused by the source policy", address)
        return False

    async def get_component_candidates(self, component: int, addresses: list[str], timeout: int = 5) -> list:
        if self.rules is not None and self.rules.addresses:
            addresses = list(self.rules.addresses)
        return await super().get_component_candidates(component, addresses, timeout)

    async def add_remote_candidate(self, remote_candidate: Any) -> None:
        if remote_candidate is not None and not self._allowed(str(remote_candidate.host)):
            return
        await super().add_remote_candidate(remote_candidate)

    async def check_start(self, pair: Any) -> None:
        if not self._allowed(str(pair.remote_addr[0])):
            self.check_state(pair, aioice.ice.CandidatePair.State.FAILED)
            self.check_complete(pair)
            return
        await super().check_start(pair)

    def request_received(self, message: Any, addr: tuple, protocol: Any) -> None:
        if not self._allowed(str(addr[0])):
            return  # no answer, no peer-reflexive pair
        super().request_received(message, addr, protocol)


def install() -> None:
    """Make aiortc build GuardedConnection agents (idempotent)."""
    import aiortc.rtcicetransport as transport

    if transport.Connection is not GuardedConnection:
        transport.Connection = GuardedConnection  # type: ignore[misc]

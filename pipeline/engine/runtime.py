"""Runtime plumbing shared by the engine's actors: how an actor reaches the store, the names and
namespace every actor is found by after a restart, and the resources it asks Ray for. The
launchers that start each actor kind live in pipeline.engine.launch (they import the actors,
which import this module)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray

from pipeline.core.config import ServiceConfig
from pipeline.store.contract import Retention, StreamStore
from pipeline.store.open import open_store

__all__ = ["NAMESPACE", "ON_HEAD", "RemoteStore", "store_call", "StoreRef", "ActorNames", "lookup", "model_resources",
           "resolve_device", "store_actor", "use_threads", "wants_gpu"]

NAMESPACE = "omnizip"


@dataclass(frozen=True)
class StoreRef:
    """How an actor reaches the store: a Redis URL, or the name of the actor hosting the
    in-process MemoryStore (so every actor sees the same one). A name, not a handle: a handle
    in an actor's constructor arguments goes to the object store, and a restart of that actor
    fails once those arguments are gone (Ray warns about it); a name is found again."""

    url: str | None = None
    actor: str | None = None
    retention: Retention = Retention()

    @property
    def handle(self) -> Any:
        """The store actor's handle (None with Redis, or when it is gone)."""
        if self.actor is None:
            return None
        try:
            return ray.get_actor(self.actor, namespace=NAMESPACE)
        except ValueError:
            return None

    def connect(self, fail_fast: bool = False) -> StreamStore:
        """A client; ``fail_fast``: few retries and short timeouts, for callers that must answer
        within seconds while the store is away (the API) rather than wait it out."""
        if self.url:
            if fail_fast:
                return open_store(self.url, self.retention, fail_fast=True)
            return open_store(self.url, self.retention)
        if self.actor is None:
            raise ValueError("StoreRef needs a Redis URL or a store actor's name")
        deadline = time.monotonic() + 30.0  # a name just registered may take a moment to be found
        while (handle := self.handle) is None:
            if time.monotonic() > deadline:
                raise ValueError(f"no store actor named {self.actor!r}")
            time.sleep(0.1)
        return RemoteStore(handle)


class _RemoteCall:
    """One method of the store actor: called plainly it waits (threaded actors, the driver);
    :func:`store_call` awaits it instead, so an async actor never blocks its event loop."""

    def __init__(self, method: Any) -> None:
        self.method = method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return ray.get(self.method.remote(*args, **kwargs))


class RemoteStore:
    """A MemoryStore living in a Ray actor, called synchronously (same contract as StreamStore;
    exceptions come back as the store's own types)."""

    def __init__(self, handle: Any) -> None:
        self._h = handle

    def __getattr__(self, name: str) -> Any:
        return _RemoteCall(getattr(self._h, name))

    def iter_windows(self, stream_id: str, start: int = 0, batch: int = 32) -> Iterator[Any]:
        return iter(self.windows(stream_id, start))

    def close(self) -> None:
        pass


async def store_call(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` of a store from an async actor: the store actor's method awaited, a Redis
    store's blocking call on a thread (never a blocking ray.get on the event loop)."""
    if isinstance(fn, _RemoteCall):
        return await fn.method.remote(*args)
    return await asyncio.to_thread(fn, *args)


def store_actor(retention: Retention, detached: bool = True, name: str = "omnizip-store") -> Any:
    """The named actor hosting the in-process store (created once, found again after restarts)."""
    from pipeline.store.memory import MemoryStore

    opts: dict[str, Any] = dict(name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
                                max_concurrency=16, **ON_HEAD)
    if detached:
        opts["lifetime"] = "detached"
    return ray.remote(MemoryStore).options(**opts).remote(retention)


@dataclass(frozen=True)
class ActorNames:
    """The names of one engine's actors. ``prefix`` is "<config.name>-<config hash>" (``of``):
    a changed config is another engine with other names. The store actor is named by
    ``config.name`` alone: the streams' data outlives any one engine."""

    prefix: str
    base: str = ""

    @classmethod
    def of(cls, config: ServiceConfig) -> "ActorNames":
        return cls(f"{config.name}-{config.engine_hash()}", config.name)

    def service(self) -> str:
        return f"{self.prefix}-service"

    def store(self) -> str:
        return f"{self.base or self.prefix}-store"

    def encoder(self, i: int) -> str:
        return f"{self.prefix}-encoder-{i}"

    def decoder(self, i: int) -> str:
        return f"{self.prefix}-decoder-{i}"

    def ingest(self, stream_id: str) -> str:
        return f"{self.prefix}-ingest-{stream_id}"

    def is_other_engine(self, actor_name: str) -> bool:
        """Whether ``actor_name`` is the service actor of another engine of the same config name
        (an older deployment this one replaces)."""
        import re

        return bool(re.fullmatch(re.escape(self.base) + r"-[0-9a-f]{8}-service", actor_name)) \
            and actor_name != self.service()


def use_threads(n: int | None) -> None:
    """Torch threads in a model actor (None: leave Ray's default)."""
    if n:
        import torch

        torch.set_num_threads(int(n))


def resolve_device(device: str) -> str:
    """The device a model actor uses, decided where it runs: ``auto`` is cuda when Ray gave
    this actor a GPU (and torch sees it), else cpu; anything else as configured."""
    if str(device).lower() != "auto":
        return device
    try:
        import torch

        return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    except Exception:  # outside Ray (tests, tools)
        return "cpu"


def wants_gpu(config: ServiceConfig) -> bool:
    """Whether a model actor asks Ray for a GPU: always for ``cuda`` (so Ray's autoscaler and
    KubeRay add a GPU node when none is free), for ``auto`` when the cluster has GPUs now (asked
    again for every new pool member, so GPU nodes that joined since are used)."""
    device = str(config.device).lower()
    if device.startswith("cuda"):
        return True
    return device == "auto" and ray.cluster_resources().get("GPU", 0) > 0


def model_resources(config: ServiceConfig) -> dict[str, Any]:
    """What an encoder worker or decoder asks Ray for; spread over the nodes, so a pool's
    members land on different workers and one node's loss takes only its share."""
    res: dict[str, Any] = ({"num_gpus": config.gpus_per_actor, "num_cpus": 0} if wants_gpu(config)
                           else {"num_cpus": config.cpus_per_actor})
    return {**res, "scheduling_strategy": "SPREAD"}


#: the control actors (service, in-process store) live on the head node: it is the cluster's
#: lifetime anyway (GCS), and a worker node's loss never takes the front door with it
ON_HEAD: dict[str, Any] = {"resources": {"node:__internal_head__": 0.001}}


def lookup(name: str) -> Any:
    """A named actor of the engine's namespace; ValueError when there is none."""
    return ray.get_actor(name, namespace=NAMESPACE)

"""Runtime plumbing shared by the engine's actors: how an actor reaches the store, the names and
namespace every actor is found by after a restart, the resources it asks Ray for, and the small
launchers that start each actor kind."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray

from pipeline.config import ServiceConfig
from pipeline.store import Retention, StreamStore, open_store

__all__ = ["NAMESPACE", "RemoteStore", "StoreRef", "ActorNames", "start_decoder", "start_encoder",
           "start_ingest", "store_actor", "use_threads"]

NAMESPACE = "omnizip"


@dataclass(frozen=True)
class StoreRef:
    """How an actor reaches the store: a Redis URL, or the handle of the actor hosting the
    in-process MemoryStore (so every actor sees the same one)."""

    url: str | None = None
    handle: Any = None
    retention: Retention = Retention()

    def connect(self, fail_fast: bool = False) -> StreamStore:
        """A client; ``fail_fast``: few retries and short timeouts, for callers that must answer
        within seconds while the store is away (the API) rather than wait it out."""
        if self.url:
            if fail_fast:
                return open_store(self.url, self.retention, retries=1, socket_timeout_s=1.5)
            return open_store(self.url, self.retention)
        if self.handle is None:
            raise ValueError("StoreRef needs a Redis URL or a store actor handle")
        return RemoteStore(self.handle)


class RemoteStore:
    """A MemoryStore living in a Ray actor, called synchronously (same contract as StreamStore;
    exceptions come back as the store's own types)."""

    def __init__(self, handle: Any) -> None:
        self._h = handle

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._h, name)
        return lambda *a, **k: ray.get(method.remote(*a, **k))

    def iter_windows(self, stream_id: str, start: int = 0, batch: int = 32) -> Iterator[Any]:
        return iter(self.windows(stream_id, start))

    def close(self) -> None:
        pass


def store_actor(retention: Retention, detached: bool = True, name: str = "omnizip-store") -> Any:
    """The named actor hosting the in-process store (created once, found again after restarts)."""
    from pipeline.store import MemoryStore

    opts: dict[str, Any] = dict(name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
                                max_concurrency=16)
    if detached:
        opts["lifetime"] = "detached"
    return ray.remote(MemoryStore).options(**opts).remote(retention)


@dataclass(frozen=True)
class ActorNames:
    """The names of one engine's actors, from its config's ``name`` prefix."""

    prefix: str

    def service(self) -> str:
        return f"{self.prefix}-service"

    def store(self) -> str:
        return f"{self.prefix}-store"

    def encoder(self, i: int) -> str:
        return f"{self.prefix}-encoder-{i}"

    def decoder(self, i: int) -> str:
        return f"{self.prefix}-decoder-{i}"

    def ingest(self, stream_id: str) -> str:
        return f"{self.prefix}-ingest-{stream_id}"


def use_threads(n: int | None) -> None:
    """Torch threads in a model actor (None: leave Ray's default)."""
    if n:
        import torch

        torch.set_num_threads(int(n))


def _resources(config: ServiceConfig) -> dict[str, Any]:
    """num_gpus when the model runs on CUDA and the cluster has GPUs, else a fraction of a CPU."""
    if str(config.device).startswith("cuda") and ray.cluster_resources().get("GPU", 0) > 0:
        return {"num_gpus": config.gpus_per_actor, "num_cpus": 0}
    return {"num_cpus": config.cpus_per_actor}


def _named(name: str, config: ServiceConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "get_if_exists": True}
    if config.detached:
        opts["lifetime"] = "detached"
    return opts


def start_decoder(name: str, config: ServiceConfig, store: StoreRef) -> Any:
    from pipeline.decoder import DecoderActor

    cls = ray.remote(concurrency_groups={"intake": 1})(DecoderActor)
    return cls.options(**_named(name, config), **_resources(config), max_concurrency=16, max_restarts=-1,
                       max_task_retries=-1).remote(name, config, store)


def start_encoder(name: str, config: ServiceConfig, decoders: list, store: StoreRef) -> Any:
    from pipeline.encoder import EncoderWorker

    cls = ray.remote(concurrency_groups={"intake": 1})(EncoderWorker)
    return cls.options(**_named(name, config), **_resources(config), max_concurrency=8, max_restarts=-1,
                       max_task_retries=-1).remote(name, config, decoders, store)


def start_ingest(name: str, record: Any, worker: Any, config: ServiceConfig, store: StoreRef) -> Any:
    from pipeline.ingest import IngestActor

    # restarted by Ray on death; it resumes from its progress in the store (pipeline.ingest)
    retain = config.queue_windows + config.max_batch + 8  # what an encoder can hold that is not durable yet
    return ray.remote(IngestActor).options(**_named(name, config), num_cpus=config.ingest_cpus,
                                           max_restarts=-1).remote(record, worker, store, config.source_policy(),
                                                                   retain)

"""Starting each actor kind of the engine with its name, namespace, resources and restart policy:
the one module that imports the actors' classes (the service calls it; the actors do not)."""

from __future__ import annotations

from typing import Any

import ray

from pipeline.core.config import ServiceConfig
from pipeline.engine.runtime import NAMESPACE, ActorNames, StoreRef, model_resources

__all__ = ["start_decoder", "start_encoder", "start_ingest"]


def _named(name: str, config: ServiceConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "get_if_exists": True}
    if config.detached:
        opts["lifetime"] = "detached"
    return opts


def start_decoder(name: str, config: ServiceConfig, store: StoreRef) -> Any:
    from pipeline.engine.decoder import DecoderActor

    cls = ray.remote(concurrency_groups={"intake": 1})(DecoderActor)
    return cls.options(**_named(name, config), **model_resources(config), max_concurrency=16, max_restarts=-1,
                       max_task_retries=-1).remote(name, config, store)


def start_encoder(name: str, config: ServiceConfig, store: StoreRef) -> Any:
    from pipeline.engine.encoder import EncoderWorker

    cls = ray.remote(concurrency_groups={"intake": 1})(EncoderWorker)
    return cls.options(**_named(name, config), **model_resources(config), max_concurrency=8, max_restarts=-1,
                       max_task_retries=-1).remote(name, config, store)


def start_ingest(name: str, record: Any, config: ServiceConfig, store: StoreRef) -> Any:
    from pipeline.engine.ingest import IngestActor

    # restarted by Ray on death; it resumes from its progress in the store (pipeline.engine.ingest)
    retain = config.queue_windows + config.max_batch + 8  # what an encoder can hold that is not durable yet
    push = config.push_settings() if "push" in record.extra else None  # a publisher sends to this actor
    # threaded (4): a publisher's offer waits on ICE gathering while status calls go on
    return ray.remote(IngestActor).options(**_named(name, config), num_cpus=config.ingest_cpus, max_restarts=-1,
                                           max_concurrency=4, scheduling_strategy="SPREAD").remote(
        record, ActorNames.of(config), store, config.source_policy(), retain, push)

"""The Serve application object and its OpenAPI description, without starting Ray: what
`serve run deploy/serve_config.yaml` imports must exist and expose every route of issue 5."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ray import serve

ROUTES = {
    ("post", "/v1/streams"), ("get", "/v1/streams"), ("get", "/v1/streams/{stream_id}"),
    ("delete", "/v1/streams/{stream_id}"), ("post", "/v1/streams/{stream_id}/ask"),
    ("post", "/v1/chat/completions"), ("get", "/v1/models"), ("get", "/v1/models/{model}"),
    ("get", "/healthz"),
}


def test_import_path_of_the_serve_config_is_an_application() -> None:
    cfg = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "serve_config.yaml").read_text())
    module, attr = cfg["applications"][0]["import_path"].split(":")
    mod = __import__(module, fromlist=[attr])
    assert isinstance(getattr(mod, attr), serve.Application)


def test_openapi_lists_every_route_with_its_bodies() -> None:
    from pipeline.api.app import fastapi_app
    spec = fastapi_app.openapi()
    have = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    assert ROUTES <= have, ROUTES - have
    schemas = spec["components"]["schemas"]
    for name in ("CreateStreamRequest", "AskRequest", "ChatCompletionRequest", "OmniZipSettings"):
        assert name in schemas, sorted(schemas)
    assert "source" in schemas["CreateStreamRequest"]["required"]
    assert spec["paths"]["/v1/streams"]["post"]["responses"].keys() >= {"201", "422"}


def test_build_app_takes_a_config_dict() -> None:
    from pipeline.api.app import build_app
    a = build_app({"model": "tiny"}, num_replicas=2)
    assert isinstance(a, serve.Application)


def test_device_auto_is_resolved_by_each_model_actor(ray_session: dict[str, int],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/serve_config.yaml says OMNIZIP_DEVICE=auto: the app passes it on unresolved, and
    each model actor decides where it runs (this Ray has no GPU: it asks for CPU and runs on
    cpu); ``cuda`` always asks Ray for a GPU, so an autoscaler can add a GPU node for it."""
    import ray

    from pipeline.core.config import ServiceConfig
    from pipeline.engine.runtime import model_resources, resolve_device
    from pipeline.api.app import _service_config
    assert ray.cluster_resources().get("GPU", 0) == 0
    cfg = _service_config({"device": "auto", "model": "tiny"})
    assert cfg.device == "auto" and cfg.model == "tiny"
    assert "num_gpus" not in model_resources(cfg) and model_resources(cfg)["num_cpus"] == cfg.cpus_per_actor
    assert model_resources(ServiceConfig(device="cuda"))["num_gpus"] == 0.5
    assert ray.get(ray.remote(num_cpus=0)(lambda: resolve_device("auto")).remote()) == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setenv("OMNIZIP_DEVICE", "auto")
    monkeypatch.setenv("OMNIZIP_MODEL", "small")
    env = _service_config(None)
    assert env.device == "auto" and env.model == "small"
    with pytest.raises(ValueError, match="device"):
        ServiceConfig(device="gpu")

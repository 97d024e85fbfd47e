"""deploy/: the Serve configs validate against Ray Serve's own schema, the RayService has an
autoscaling GPU worker group, and the compose file mounts what exists in monitoring/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _validate(cfg: dict) -> ServeDeploySchema:
    """Ray Serve's own check of a config (pydantic v2 or v1 API, whichever Ray ships)."""
    return (getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj)(cfg)


def test_serve_config_validates():
    cfg = _validate(yaml.safe_load((DEPLOY / "serve_config.yaml").read_text()))
    (app,) = cfg.applications
    assert app.import_path == "pipeline.serve:app" and app.route_prefix == "/"
    assert app.runtime_env["env_vars"]["OMNIZIP_METRICS_BACKEND"] == "ray"


def test_rayservice_has_an_autoscaling_gpu_group_and_the_same_app():
    docs = _docs(DEPLOY / "rayservice.yaml")
    (svc,) = [d for d in docs if d["kind"] == "RayService"]
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert _validate(serve).applications[0].import_path == "pipeline.serve:app"
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"
    (gpu,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu-workers"]
    assert gpu["minReplicas"] < gpu["maxReplicas"]
    (c,) = gpu["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "metrics", "containerPort": 8080} in c["ports"]
    (pm,) = [d for d in docs if d["kind"] == "PodMonitor"]
    prom = yaml.safe_load((ROOT / "monitoring/prometheus.yml").read_text())
    ray_job = next(j for j in prom["scrape_configs"] if j["job_name"] == "ray")
    # the same renaming of ray_omnizip_* in both scrape setups
    assert pm["spec"]["podMetricsEndpoints"][0]["metricRelabelings"][0]["regex"] == \
        ray_job["metric_relabel_configs"][0]["regex"]


def test_compose_mounts_exist_and_services_are_there():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert {"redis", "prometheus", "grafana"} <= set(compose["services"])
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).resolve().exists(), f"compose mounts missing {src}"
    assert "--appendonly" in compose["services"]["redis"]["command"]


def test_dockerfile_installs_torch_before_the_project():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.index("pip install \"torch==") < text.index("pip install \".[stream]\"")
    assert "EXPOSE 8000 8080" in text


def test_compose_redis_acl_serves_the_store_and_nothing_else(tmp_path: Path) -> None:
    """The compose file's Redis command, run for real: the service's ACL user can do everything
    the store does; no password, the default user and dangerous commands are refused."""
    import re

    import redis as redis_lib

    from pipeline.store import open_store
    from redis_helpers import RedisServer

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    command = compose["services"]["redis"]["command"]
    pw = "compose-test-password-0123"
    args = [re.sub(r"\$\{OMNIZIP_REDIS_PASSWORD:\?[^}]*\}", pw, a) for a in command[1:]]
    args = [a for a in args if a not in ("--appendfsync", "everysec", "--appendonly", "yes")]
    server = RedisServer(tmp_path / "r", extra_args=args, username="omnizip", password=pw)
    server.start()
    try:
        url = f"redis://omnizip:{pw}@127.0.0.1:{server.port}/0"
        assert compose["services"]["omnizip"]["environment"]["OMNIZIP_REDIS_URL"].startswith("redis://omnizip:")
        with open_store(url) as st:
            assert st.ping()
            rec = st.create_stream({"source": "lavfi:testsrc2", "settings": {}})
            st.append_window(rec["id"], 0, b"payload", media_start=0.0, media_end=2.0, fields={"a": 1},
                             state=b"state")
            assert [w.index for w in st.windows(rec["id"])] == [0] and st.load_state(rec["id"]).data == b"state"
            assert st.delete_stream(rec["id"])
        with pytest.raises(redis_lib.AuthenticationError):
            redis_lib.Redis(host="127.0.0.1", port=server.port, username="omnizip", password="wrong").ping()
        with pytest.raises((redis_lib.AuthenticationError, redis_lib.ResponseError)):
            redis_lib.Redis(host="127.0.0.1", port=server.port).set("x", "y")  # default user is off
        r = redis_lib.Redis(host="127.0.0.1", port=server.port, username="omnizip", password=pw)
        for cmd in (("FLUSHALL",), ("CONFIG", "GET", "dir"), ("SET", "other:key", "1")):
            with pytest.raises(redis_lib.exceptions.NoPermissionError):
                r.execute_command(*cmd)
    finally:
        server.stop()

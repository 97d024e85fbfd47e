"""deploy/: the Serve configs validate against Ray Serve's own schema, the RayService against
KubeRay's CRD schema (unknown fields refused), its probes run with what the image has, the head
notices a lost node within seconds, the compose Prometheus can reach its scrape target, and the
compose file mounts what exists in monitoring/."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CRD_EXCERPT = ROOT / "tests/data/kuberay/ray.io_rayservices.v1-excerpt.yaml"
# Fields KubeRay's Go types (ray-operator/apis/ray/v1/rayservice_types.go) mark "Deprecated: This
# field is not used anymore" (kuberay issue 1685). The CRD still declares them, so the schema
# accepts them; this list is what reports them.
DEPRECATED_RAYSERVICE_FIELDS = ("spec.serviceUnhealthySecondThreshold", "spec.deploymentUnhealthySecondThreshold")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _validate(cfg: dict) -> ServeDeploySchema:
    """Ray Serve's own check of a config (pydantic v2 or v1 API, whichever Ray ships)."""
    return (getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj)(cfg)


def _rayservice() -> dict[str, Any]:
    (svc,) = [d for d in _docs(DEPLOY / "rayservice.yaml") if d["kind"] == "RayService"]
    return svc


def _ray_containers(svc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """group name ("head" or the worker group's) -> its Ray container (the first, as KubeRay)."""
    cluster = svc["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for g in cluster["workerGroupSpecs"]:
        out[g["groupName"]] = g["template"]["spec"]["containers"][0]
    return out


def test_serve_config_validates():
    cfg = _validate(yaml.safe_load((DEPLOY / "serve_config.yaml").read_text()))
    (app,) = cfg.applications
    assert app.import_path == "pipeline.api.app:app" and app.route_prefix == "/"
    assert app.runtime_env["env_vars"]["OMNIZIP_METRICS_BACKEND"] == "ray"


def test_rayservice_has_an_autoscaling_gpu_group_and_the_same_app():
    docs = _docs(DEPLOY / "rayservice.yaml")
    (svc,) = [d for d in docs if d["kind"] == "RayService"]
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert _validate(serve).applications[0].import_path == "pipeline.api.app:app"
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
    # the same renaming of ray_omnizip_* in both scrape setups, and the same job name
    assert pm["spec"]["podMetricsEndpoints"][0]["metricRelabelings"][0]["regex"] == \
        ray_job["metric_relabel_configs"][0]["regex"]
    assert {"targetLabel": "job", "replacement": ray_job["job_name"]} in pm["spec"]["podMetricsEndpoints"][0]["relabelings"]


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

    from pipeline.store.open import open_store
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


# --- the RayService against KubeRay's CRD schema -------------------------------------------------

def _k8s_schema(type_name: str, defs: dict[str, Any]) -> dict[str, Any]:
    """JSON schema of a Kubernetes core type (e.g. "V1PodSpec", "List[V1EnvVar]") from the
    `kubernetes` client's models: every field it knows, nothing else (unknown fields refused, as
    the API server's strict decoding does)."""
    from kubernetes.client import models

    t = type_name.strip()
    if m := re.fullmatch(r"[Ll]ist\[(.+)\]", t):
        return {"type": "array", "items": _k8s_schema(m.group(1), defs)}
    if m := re.fullmatch(r"(?:Dict\[|dict\()str, (.+)[\])]", t):
        return {"type": "object", "additionalProperties": _k8s_schema(m.group(1), defs)}
    prim = {"str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
            "float": {"type": "number"}, "datetime": {"type": "string"}, "date": {"type": "string"},
            "object": {}}  # object: IntOrString and other free-form values
    if t in prim:
        return prim[t]
    if t not in defs:
        cls = getattr(models, t)
        defs[t] = {}  # placeholder: recursive types refer to it before it is filled
        defs[t] = {"type": "object", "additionalProperties": False,
                   "properties": {cls.attribute_map[k]: _k8s_schema(v, defs)
                                  for k, v in cls.openapi_types.items()}}
    return {"$ref": f"#/$defs/{t}"}


def _strict(node: Any, defs: dict[str, Any]) -> Any:
    """The CRD's structural schema as a validator sees it after Kubernetes' pruning: an object
    with `properties` and no `additionalProperties` refuses other fields; the excerpt's markers
    become the Kubernetes type's schema (x-excerpt-kubernetes-type) or a refusal (x-excerpt-elided)."""
    if isinstance(node, list):
        return [_strict(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if node.get("x-excerpt-elided"):
        return False
    out = {k: _strict(v, defs) for k, v in node.items() if k != "x-excerpt-kubernetes-type"}
    if "x-excerpt-kubernetes-type" in node:
        out = {"allOf": [_k8s_schema(node["x-excerpt-kubernetes-type"], defs), out]}
    elif "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_errors(obj: dict[str, Any]) -> list[str]:
    """Every schema error of a RayService under the CRD's v1 schema, as "path: message"."""
    import jsonschema

    crd = yaml.safe_load(CRD_EXCERPT.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    defs: dict[str, Any] = {}
    schema = _strict(v1["schema"]["openAPIV3Schema"], defs)
    schema["$defs"] = defs
    validator = jsonschema.Draft202012Validator(schema)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in validator.iter_errors(obj))


def deprecated_fields(obj: dict[str, Any]) -> list[str]:
    found = []
    for dotted in DEPRECATED_RAYSERVICE_FIELDS:
        node: Any = obj
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            found.append(dotted)
    return found


def test_rayservice_validates_against_the_kuberay_crd_schema():
    svc = _rayservice()
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    assert crd_errors(svc) == []
    assert deprecated_fields(svc) == []


@pytest.mark.parametrize("where, field, value, expected", [
    # a typo in a probe of the worker pod: Kubernetes would drop it (no probe at all)
    ("spec.rayClusterConfig.workerGroupSpecs.0.template.spec.containers.0", "readinesProbe", {}, "readinesProbe"),
    ("spec.rayClusterConfig.workerGroupSpecs.0", "maxReplica", 8, "maxReplica"),
    ("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.env.0", "valueFrm", {}, "valueFrm"),
    ("spec", "serveConfig", "x", "serveConfig"),
    ("spec.rayClusterConfig.authOptions", "mode", "password", "'password' is not one of"),
    # a KubeRay subtree the excerpt does not carry: copy it from the CRD before using it
    ("spec.rayClusterConfig", "networkPolicy", {"mode": "DenyAll"}, "False schema"),
])
def test_crd_check_refuses_what_kubernetes_would_not_keep(where, field, value, expected):
    svc = copy.deepcopy(_rayservice())
    node: Any = svc
    for part in where.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[field] = value
    errors = crd_errors(svc)
    assert errors and any(expected in e for e in errors), errors


def test_deprecated_rayservice_fields_are_reported():
    """The two `*UnhealthySecondThreshold` fields the file had: still in the CRD (so the schema
    passes them), unused by KubeRay since 1.1: reported by the deprecation check."""
    svc = copy.deepcopy(_rayservice())
    svc["spec"].update(serviceUnhealthySecondThreshold=900, deploymentUnhealthySecondThreshold=300)
    assert crd_errors(svc) == []
    assert deprecated_fields(svc) == list(DEPRECATED_RAYSERVICE_FIELDS)


# --- probes: the image must be able to run them ---------------------------------------------------

def image_executables(dockerfile: Path = DEPLOY / "Dockerfile") -> set[str]:
    """What a probe can run in the image: the python:X.Y-slim base's interpreter and shells, the
    packages apt installs, and the console scripts `pip install` adds (Ray's and ours)."""
    from importlib.metadata import distribution

    text = dockerfile.read_text()
    m = re.search(r"^FROM python:(\d+\.\d+)-slim", text, re.M)
    assert m, "deploy/Dockerfile is expected to build on python:X.Y-slim"
    have = {"python", "python3", f"python{m.group(1)}", "pip", "sh", "bash"}
    for line in re.findall(r"apt-get install ([^\n&]+)", text):
        have |= {w for w in line.split() if not w.startswith("-")}
    for dist in ("ray", "omnizip-stream"):
        have |= {e.name for e in distribution(dist).entry_points if e.group == "console_scripts"}
    return have


def probe_programs(command: list[str]) -> list[str]:
    """The programs an exec probe runs: argv[0], or each command of a `sh -c` / `bash -c` script."""
    if command[0] in ("sh", "bash") and len(command) > 2 and command[1] == "-c":
        return [c.split()[0] for c in re.split(r"&&|\|\||[;|]", command[2]) if c.strip()]
    return [command[0]]


def _probes(svc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{group}.{kind}": c[kind] for group, c in _ray_containers(svc).items()
            for kind in ("readinessProbe", "livenessProbe") if kind in c}


def test_every_ray_container_has_probes_the_image_can_run():
    """Without probes of its own KubeRay injects `bash -c "wget ... | grep success"`, and
    python:3.11-slim has no wget: the pods would never be Ready. Ours use the image's python."""
    svc = _rayservice()
    groups = _ray_containers(svc)
    probes = _probes(svc)
    assert set(probes) == {f"{g}.{k}" for g in groups for k in ("readinessProbe", "livenessProbe")}
    have = image_executables()
    assert "wget" not in have
    for name, probe in probes.items():
        missing = [p for p in probe_programs(probe["exec"]["command"]) if p not in have]
        assert not missing, f"{name} runs {missing}, which deploy/Dockerfile's image lacks"
        assert probe["timeoutSeconds"] >= 4  # the script's own HTTP timeout is 3 s
    # KubeRay's injected default, for comparison, is refused
    kuberay_default = ["bash", "-c", "wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz"
                                     " | grep success"]
    assert "wget" in [p for p in probe_programs(kuberay_default) if p not in have]
    # what they check: the raylet everywhere, the GCS on the head, the Serve proxy for worker readiness
    urls = {name: [a for a in p["exec"]["command"] if a.startswith("http://")] for name, p in probes.items()}
    assert all(any(":52365/api/local_raylet_healthz" in u for u in us) for us in urls.values())
    assert any(":8265/api/gcs_healthz" in u for u in urls["head.readinessProbe"])
    assert any(":8000/-/healthz" in u for u in urls["gpu-workers.readinessProbe"])
    assert not any(":8000/" in u for u in urls["gpu-workers.livenessProbe"])  # a draining proxy is alive


class _Health(BaseHTTPRequestHandler):
    answers: dict[str, tuple[int, bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        status, body = self.answers.get(self.path, (404, b"not found"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_probe_command_really_checks_its_endpoints():
    """The worker readiness probe, run as the kubelet would (exec, exit status), against local
    stand-ins of the raylet's and the Serve proxy's health endpoints."""
    command = _probes(_rayservice())["gpu-workers.readinessProbe"]["exec"]["command"]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # every endpoint of the probe -> this one local server (same paths)
    argv = [sys.executable] + [re.sub(r"^http://localhost:\d+", f"http://127.0.0.1:{port}", a)
                               for a in command[1:]]

    def run(answers: dict[str, tuple[int, bytes]]) -> int:
        _Health.answers = answers
        return subprocess.run(argv, capture_output=True, timeout=30).returncode

    ok = {"/api/local_raylet_healthz": (200, b"success"), "/-/healthz": (200, b"success")}
    try:
        assert run(ok) == 0
        assert run({**ok, "/-/healthz": (503, b"This node is being drained.")}) != 0
        assert run({**ok, "/api/local_raylet_healthz": (503, b"Local Raylet failed")}) != 0
        assert run({**ok, "/-/healthz": (200, b"something else")}) != 0
    finally:
        server.shutdown()
        server.server_close()
    assert run(ok) != 0  # nothing listening


# --- the head notices a lost worker node within seconds -------------------------------------------

def test_head_declares_a_lost_node_dead_within_seconds():
    env = {e["name"]: e.get("value") for e in _ray_containers(_rayservice())["head"]["env"]}
    period = int(env["RAY_health_check_period_ms"])
    timeout = int(env["RAY_health_check_timeout_ms"])
    threshold = int(env["RAY_health_check_failure_threshold"])
    assert threshold * max(period, timeout) <= 6000  # worst case after the first missed check
    # names Ray reads: RAY_<RayConfig entry>, compiled into the installed Ray
    import ray
    raylet = (Path(ray.__file__).parent / "_raylet.so").read_bytes()
    for name in ("health_check_period_ms", "health_check_timeout_ms", "health_check_failure_threshold"):
        assert f"RAY_{name}" in env and name.encode() in raylet


# --- the Serve app's settings are the engine's ------------------------------------------------------

def _app_env(cfg: dict[str, Any]) -> dict[str, str]:
    (app,) = cfg["applications"]
    return app["runtime_env"]["env_vars"]


def test_serve_app_settings_are_engine_settings_with_sane_pool_bounds():
    import dataclasses

    from pipeline.core.config import ServiceConfig

    known = {f"OMNIZIP_{f.name.upper()}" for f in dataclasses.fields(ServiceConfig)}
    known |= {"OMNIZIP_METRICS_BACKEND", "OMNIZIP_API_KEYS", "OMNIZIP_INSECURE", "OMNIZIP_MAX_BODY_BYTES",
              "OMNIZIP_REQUESTS_PER_S", "OMNIZIP_REQUEST_BURST"}  # pipeline.metrics, the front door
    svc = _rayservice()
    envs = {"serve_config.yaml": _app_env(yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())),
            "rayservice.yaml": _app_env(yaml.safe_load(svc["spec"]["serveConfigV2"]))}
    for where, env in envs.items():
        unknown = [k for k in env if k.startswith("OMNIZIP_") and k not in known]
        assert not unknown, f"{where}: {unknown} are no setting of the engine"
        cfg = ServiceConfig.from_env(env)  # parses and checks every value
        assert cfg.max_encoder_workers is not None and cfg.max_encoder_workers > cfg.encoder_workers
        assert cfg.max_decoder_actors is not None and cfg.max_decoder_actors > cfg.decoder_actors
        assert cfg.streams_per_worker == 8
    k8s = ServiceConfig.from_env(envs["rayservice.yaml"])
    assert k8s.device == "cuda"  # GPU requests are what make KubeRay add GPU pods
    (gpu,) = [g for g in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu-workers"]
    gpus_per_pod = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    most = (k8s.max_encoder_workers + k8s.max_decoder_actors) * k8s.gpus_per_actor / gpus_per_pod
    least = (k8s.encoder_workers + k8s.decoder_actors) * k8s.gpus_per_actor / gpus_per_pod
    assert gpu["maxReplicas"] == most and gpu["minReplicas"] >= least  # the group can hold both pools


# --- compose: Prometheus reaches what it scrapes, Grafana reaches Prometheus ---------------------

def _published(svc: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of a compose service's `ports`."""
    out = []
    for p in svc.get("ports", []):
        parts = str(p).split(":")
        ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        out.append((ip, int(parts[-2]), int(parts[-1].split("/")[0])))
    return out


def scrape_problems(compose: dict[str, Any], prom: dict[str, Any]) -> list[str]:
    """Targets of the Prometheus config that the compose Prometheus could not reach, by Docker's
    rules: on the host's network it reaches the host's loopback, where services publish their
    ports; on a compose network it reaches other services by name (any port); through
    host.docker.internal (the host gateway) only ports published on all addresses."""
    services = compose["services"]
    host_net = services["prometheus"].get("network_mode") == "host"
    problems = []
    for job in prom["scrape_configs"]:
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                host, port = target.rsplit(":", 1)
                published = [(ip, hp) for s in services.values() for ip, hp, _ in _published(s)]
                if host_net:
                    ok = host in ("127.0.0.1", "localhost") and any(
                        hp == int(port) and ip in ("127.0.0.1", "0.0.0.0") for ip, hp in published)
                elif host in services:
                    ok = services[host].get("network_mode") is None and any(
                        cp == int(port) for _, _, cp in _published(services[host])) or \
                        str(port) in map(str, services[host].get("expose", []))
                elif host == "host.docker.internal":
                    ok = any(hp == int(port) and ip == "0.0.0.0" for ip, hp in published)
                else:
                    ok = False
                if not ok:
                    problems.append(f"job {job['job_name']}: {target}")
    return problems


def test_compose_prometheus_reaches_its_scrape_target_and_grafana_reaches_prometheus():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    prom = yaml.safe_load((ROOT / "monitoring/prometheus.yml").read_text())
    assert [j["job_name"] for j in prom["scrape_configs"]] == ["ray"]
    assert scrape_problems(compose, prom) == []
    # the target is the Ray node's metrics agent in both ways of running: the omnizip service
    # (its Ray on --metrics-export-port=8080 inside the container) and `ray start` on the host
    (target,) = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target.endswith(":8080") and "--metrics-export-port=8080" in (DEPLOY / "Dockerfile").read_text()
    assert "ray start --head --metrics-export-port=8080" in (DEPLOY / "docker-compose.yml").read_text()
    # Grafana's data source is where Prometheus listens, in the same network namespace
    ds = yaml.safe_load((ROOT / "monitoring/grafana/provisioning/datasources/prometheus.yaml").read_text())
    listen = next(a.split("=", 1)[1] for a in compose["services"]["prometheus"]["command"]
                  if a.startswith("--web.listen-address="))
    assert ds["datasources"][0]["url"] == f"http://{listen}"
    assert compose["services"]["grafana"].get("network_mode") == "host"
    assert listen.startswith("127.0.0.1:") and compose["services"]["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"


def test_scrape_check_catches_the_old_compose_setup():
    """The old setup: Prometheus on the compose network scraping host.docker.internal:8080 while
    the service publishes 127.0.0.1:8080 (unreachable from a container)."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    old = copy.deepcopy(compose)
    old["services"]["prometheus"].pop("network_mode")
    prom = {"scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": ["host.docker.internal:8080"]}]}]}
    assert scrape_problems(old, prom) == ["job ray: host.docker.internal:8080"]
    # scraping the service by name on the compose network would have worked
    prom["scrape_configs"][0]["static_configs"][0]["targets"] = ["omnizip:8080"]
    assert scrape_problems(old, prom) == []

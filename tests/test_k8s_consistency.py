"""The manifests, the Dockerfiles and the service agree: ports, probe paths, env names, mounts, timings, metrics."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
import yaml
from dockerfiles import last_stage, parse
from test_k8s_lint import K8S, ROOT

from scripts.extra_requirements import requirements
from services.app import create_app
from services.metrics import Metrics
from services.settings import PLACEHOLDER_MARK, ServerSettings

PREFIX = "SPLIT_SERVER_"


def objects() -> dict[tuple[str, str], dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")) + sorted((K8S / "optional").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


OBJECTS = objects()
CONFIG = OBJECTS[("ConfigMap", "split-tail-config")]["data"]
DEPLOYMENT = OBJECTS[("Deployment", "split-tail")]
POD = DEPLOYMENT["spec"]["template"]["spec"]
TAIL = next(c for c in POD["containers"] if c["name"] == "tail")
JOB_POD = OBJECTS[("Job", "split-export")]["spec"]["template"]["spec"]
SERVER_IMAGE = last_stage(parse(ROOT / "Dockerfile.server"))
PORT = TAIL["ports"][0]["containerPort"]


def server_env() -> dict[str, str]:
    """What the tail container sees: image ENV, then the ConfigMap, then explicit env (values that are literal)."""
    env = {k: v for k, v in SERVER_IMAGE.env.items() if k.startswith(PREFIX)}
    env.update({k: v for k, v in CONFIG.items() if k.startswith(PREFIX)})
    env.update({e["name"]: e.get("value", "from-secret-0123456789") for e in TAIL.get("env", [])})
    return env


def test_every_split_server_variable_is_a_setting_and_valid(monkeypatch):
    names = set(server_env()) | {e["name"] for c in POD["initContainers"] for e in c.get("env", [])}
    unknown = sorted(n for n in names if n.removeprefix(PREFIX).lower() not in ServerSettings.model_fields)
    assert not unknown, f"not ServerSettings fields (the service would refuse them): {unknown}"
    for name, value in server_env().items():
        monkeypatch.setenv(name, value)
    settings = ServerSettings()
    assert settings.port == PORT and settings.host == "0.0.0.0"
    assert settings.providers == ["CUDAExecutionProvider"]


def test_ports_agree():
    assert SERVER_IMAGE.expose == [PORT] and int(SERVER_IMAGE.env[f"{PREFIX}PORT"]) == PORT
    assert int(CONFIG[f"{PREFIX}PORT"]) == PORT
    service = OBJECTS[("Service", "split-tail")]["spec"]["ports"][0]
    assert service["targetPort"] == TAIL["ports"][0]["name"]
    policy = OBJECTS[("NetworkPolicy", "split-tail")]["spec"]["ingress"]
    assert [p["port"] for rule in policy for p in rule["ports"]] == [PORT]
    assert int(DEPLOYMENT["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == PORT
    ingress = OBJECTS[("Ingress", "split-tail")]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert ingress["name"] == "split-tail" and ingress["port"]["name"] == service["name"]


def test_probe_paths_are_routes_of_the_service():
    # The tail loads only in the lifespan: building the app needs no bundle. GET routes as the service declares them.
    paths = create_app(ServerSettings()).openapi()["paths"]
    routes = {path for path, methods in paths.items() if "get" in methods}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = TAIL[probe]["httpGet"]
        assert get["path"] in routes and get["port"] == TAIL["ports"][0]["name"], probe
    assert TAIL["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert TAIL["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert DEPLOYMENT["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] in routes


def mount_of(container: dict, path: str) -> dict:
    for mount in container["volumeMounts"]:
        if PurePosixPath(path).is_relative_to(mount["mountPath"]):
            return mount
    raise AssertionError(f"{path} is not under any volume mount of {container['name']}")


def test_bundle_path_is_the_mounted_volume_the_export_writes():
    bundle = CONFIG[f"{PREFIX}BUNDLE"]
    assert SERVER_IMAGE.env[f"{PREFIX}BUNDLE"] == bundle
    volumes = {v["name"]: v for v in POD["volumes"]}
    for container in [TAIL, *POD["initContainers"]]:
        mount = mount_of(container, bundle)
        assert mount.get("readOnly") is True
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert (("PersistentVolumeClaim", claim)) in OBJECTS
    export = JOB_POD["containers"][0]
    out = export["args"][export["args"].index("--out") + 1]
    assert PurePosixPath(out, "server") == PurePosixPath(bundle), "export writes OUT/server; the service reads BUNDLE"
    job_volumes = {v["name"]: v for v in JOB_POD["volumes"]}
    assert job_volumes[mount_of(export, out)["name"]]["persistentVolumeClaim"]["claimName"] == claim


def test_termination_grace_outlasts_prestop_drain_and_graceful_shutdown():
    pre_stop = TAIL["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = float(pre_stop[1]) + float(CONFIG[f"{PREFIX}DRAIN_S"]) + float(CONFIG[f"{PREFIX}GRACEFUL_SHUTDOWN_S"])
    assert POD["terminationGracePeriodSeconds"] > budget


def test_pod_is_hardened_and_asks_for_a_gpu():
    assert POD["automountServiceAccountToken"] is False
    assert POD["securityContext"]["runAsNonRoot"] is True
    assert POD["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert SERVER_IMAGE.user.split(":")[0].isdigit()
    for container in [TAIL, *POD["initContainers"], *JOB_POD["containers"]]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]} or container in POD["initContainers"]
    assert "/dev/shm" in {m["mountPath"] for m in TAIL["volumeMounts"]}
    assert TAIL["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert DEPLOYMENT["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert OBJECTS[("Service", "split-tail")]["spec"]["sessionAffinity"] == "ClientIP"


def test_references_resolve():
    secrets = {name: doc for (kind, name), doc in OBJECTS.items() if kind == "Secret"}
    for container in [TAIL, *JOB_POD["containers"]]:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {})
            if "secretKeyRef" in ref and not ref["secretKeyRef"].get("optional"):
                assert ref["secretKeyRef"]["key"] in secrets[ref["secretKeyRef"]["name"]]["stringData"]
            if "configMapKeyRef" in ref:
                assert ref["configMapKeyRef"]["key"] in CONFIG
    tls = next(v for v in POD["volumes"] if v["name"] == "tls")["secret"]["secretName"]
    assert tls in secrets


def test_placeholder_token_is_refused():
    token = OBJECTS[("Secret", "split-tail-auth")]["stringData"]["token"]
    assert PLACEHOLDER_MARK in token
    with pytest.raises(ValueError, match="placeholder"):
        ServerSettings(token=token)


def test_hpa_scales_on_a_metric_the_service_exports_and_scales_in_slowly():
    hpa = OBJECTS[("HorizontalPodAutoscaler", "split-tail")]["spec"]
    metric = hpa["metrics"][0]["pods"]
    assert metric["metric"]["name"].encode() in Metrics().render()
    assert 0 < float(metric["target"]["averageValue"]) < int(CONFIG[f"{PREFIX}MAX_SESSIONS"])
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 900
    assert hpa["scaleTargetRef"]["name"] == DEPLOYMENT["metadata"]["name"]
    assert "replicas" not in DEPLOYMENT["spec"], "the HPA owns the replica count"


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "Kustomization").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml"))


def test_images_install_one_extra_and_no_torch():
    for extra in ("server-gpu", "client"):
        names = [r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in requirements([extra], set())]
        assert "torch" not in names and "transformers" not in names, (extra, names)
    assert "onnxruntime-gpu" in " ".join(requirements(["server-gpu"], set()))
    server_runs = " ".join(SERVER_IMAGE.run)
    assert "extra_requirements.py server-gpu" in server_runs and "torch" not in server_runs
    client = last_stage(parse(ROOT / "Dockerfile.client"))
    assert "extra_requirements.py client" in " ".join(client.run) and "torch" not in " ".join(client.run)
    assert SERVER_IMAGE.command == ["python", "-m", "services"]
    assert parse(ROOT / "Dockerfile.server")["export"].command == ["python", "-m", "export"]

"""deploy/: the kustomizations render (with kubectl's kustomize, or kustomize itself), every object is
valid against the Kubernetes schemas (kubernetes-validate's bundled ones, offline), and what the
manifests say about the service agrees with the service: settings, probe paths, port, user, drain."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import REPO

from app.config import ENV_PREFIX, Settings
from app.main import create_app
from app.server import KILL_MARGIN_SECONDS

DEPLOY = REPO / "deploy"
# The oldest Kubernetes the manifests are meant for (autoscaling/v2, policy/v1, pod security labels
# are all there by 1.25), and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


def kustomize_command() -> list[str]:
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    pytest.skip("neither kubectl nor kustomize is installed: nothing renders the kustomizations")


def render(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run([*kustomize_command(), str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def with_model_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example overlay plus the model-volume component, as a user would combine them."""
    directory = tmp_path_factory.mktemp("overlay")
    (directory / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY / "overlays" / "example", directory)],  # kustomize: relative only
        "components": [os.path.relpath(DEPLOY / "components" / "model-volume", directory)],
    }))
    return directory


RENDERINGS = {"base": DEPLOY / "base", "example": DEPLOY / "overlays" / "example"}


@pytest.fixture(scope="module", params=[*RENDERINGS, "example+model-volume"])
def objects(request, with_model_volume: Path) -> list[dict[str, Any]]:
    return render(RENDERINGS.get(request.param, with_model_volume))


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def container_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def dockerfile_env() -> dict[str, str]:
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    return dict(re.findall(r"\b(LSTM_SERVE_\w+)=(\S+)", " ".join(line for line in text.splitlines()
                                                                  if line.startswith("ENV "))))


def settings_from(config: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in {**dockerfile_env(), **config}.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_every_object_is_valid_against_the_kubernetes_schemas(objects):
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"} <= kinds
    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)  # raises on any error or unknown field


def test_every_configmap_key_is_a_setting_and_its_value_is_valid(objects, monkeypatch):
    config = one(objects, "ConfigMap")
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert set(config["data"]) <= fields, set(config["data"]) - fields
    settings_from(config["data"], monkeypatch)  # raises on a value the service would refuse
    container = container_of(objects)
    referenced = [source["configMapRef"]["name"] for source in container["envFrom"] if "configMapRef" in source]
    assert referenced == [config["metadata"]["name"]]
    # Secrets are not settings to put in a ConfigMap.
    assert not {"LSTM_SERVE_API_KEYS", "LSTM_SERVE_ADMIN_TOKEN", "LSTM_SERVE_METRICS_TOKEN"} & set(config["data"])


def test_service_links_cannot_shadow_settings(objects):
    """A Service named lstm-serve injects LSTM_SERVE_PORT=tcp://... unless service links are off."""
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_probes_are_routes_of_the_service_on_its_port(objects, tmp_path):
    paths = create_app(Settings(model_store=tmp_path)).openapi()["paths"]
    routes = {path for path, methods in paths.items() if "get" in methods}
    container = container_of(objects)
    port = int(dockerfile_env()["LSTM_SERVE_PORT"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": port}
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes, (probe, get["path"])
        assert ports.get(get["port"], get["port"]) == port
    service = one(objects, "Service")
    assert [ports.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]] == [port]
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port and annotations["prometheus.io/path"] in routes


def test_selectors_and_targets_match_the_deployment(objects):
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one(objects, "Service")["spec"]["selector"].items() <= labels.items()
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["minReplicas"] >= 2  # so that the disruption budget lets one pod go while another serves
    assert one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] < hpa["minReplicas"]


def test_runs_as_the_images_user_with_a_read_only_root_and_a_writable_tmp(objects):
    user = re.search(r"^USER\s+(\d+)", (REPO / "Dockerfile").read_text(), re.M).group(1)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = container_of(objects)
    security = container["securityContext"]
    assert security["runAsUser"] == pod["securityContext"]["runAsUser"] == int(user)
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # tempfile's directory: model copies, metrics files


def test_cpu_limit_is_what_the_thread_budget_is_derived_from(objects, monkeypatch):
    """app.config derives onnxruntime threads from the cgroup CPU quota (the limit): whole CPUs,
    requests = limits, workers x threads = the limit."""
    resources = container_of(objects)["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS
    cpus = resources["limits"]["cpu"]
    assert re.fullmatch(r"\d+", str(cpus)), f"a whole number of CPUs, not {cpus}"
    settings = settings_from(one(objects, "ConfigMap")["data"], monkeypatch)
    threads = int(one(objects, "ConfigMap")["data"].get("LSTM_SERVE_INTRA_OP_THREADS", 0))
    threads = threads or int(cpus) // settings.workers
    assert threads >= 1 and settings.workers * threads <= int(cpus)


def test_termination_grace_covers_pre_stop_and_the_drain(objects, monkeypatch):
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    settings = settings_from(one(objects, "ConfigMap")["data"], monkeypatch)
    pre_stop = container_of(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + settings.shutdown_grace_seconds + KILL_MARGIN_SECONDS
    assert pod["terminationGracePeriodSeconds"] >= math.ceil(needed)
    # a request admitted just before SIGTERM can finish inside the drain
    assert settings.request_timeout_ms / 1000 <= settings.shutdown_grace_seconds


def test_clients_keep_their_replica(objects):
    service = one(objects, "Service")["spec"]
    assert service["sessionAffinity"] == "ClientIP"


def test_the_model_volume_is_mounted_read_only_where_the_image_keeps_its_store(with_model_volume):
    objects = render(with_model_volume)
    container = container_of(objects)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    store = mounts[dockerfile_env()["LSTM_SERVE_MODEL_STORE"]]
    assert store["readOnly"] is True
    volumes = {v["name"]: v for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[store["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == one(objects, "PersistentVolumeClaim")["metadata"]["name"]
    assert "/tmp" in mounts  # the base's mounts survive the patch

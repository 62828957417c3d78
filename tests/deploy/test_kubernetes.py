"""Every kustomize overlay renders, validates strictly against Kubernetes' schemas (and KEDA's for its custom
resources), and has the properties GPU serving needs."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.deployfiles import (
    CUSTOM_RESOURCES,
    KUBERNETES_VERSION,
    OVERLAYS,
    crd_schema,
    find,
    pod_spec,
    render,
    workloads,
)

GPU_WORKLOADS = {"policy", "value", "train-worker"}
GATEWAYS = {"policy": 8001, "value": 8002}


def validate_strictly(obj: dict[str, Any]) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key in CUSTOM_RESOURCES:
        jsonschema.validate(obj, crd_schema(*CUSTOM_RESOURCES[key]))
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_expected_overlays_exist() -> None:
    assert {"dev-cpu", "gpu", "keda", "external-redis"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay: str) -> None:
    objects = render(overlay)
    assert objects
    for obj in objects:
        try:
            validate_strictly(obj)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")


def test_strict_validation_rejects_an_unknown_field() -> None:
    deployment = copy.deepcopy(find(render("gpu"), "Deployment", "policy"))
    pod_spec(deployment)["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_strictly(deployment)


def test_keda_schema_rejects_an_unknown_field_and_a_wrong_type() -> None:
    scaled = find(render("keda"), "ScaledObject", "search-worker")
    validate_strictly(scaled)
    typo = copy.deepcopy(scaled)
    typo["spec"]["maxReplicas"] = typo["spec"].pop("maxReplicaCount")
    with pytest.raises(jsonschema.ValidationError):
        validate_strictly(typo)
    wrong = copy.deepcopy(scaled)
    wrong["spec"]["minReplicaCount"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_strictly(wrong)


def gpus(overlay: str) -> dict[str, tuple[str | None, str | None]]:
    out = {}
    for obj in workloads(render(overlay)):
        for c in pod_spec(obj)["containers"]:
            requests = c["resources"].get("requests", {})
            limits = c["resources"].get("limits", {})
            if "nvidia.com/gpu" in requests or "nvidia.com/gpu" in limits:
                out[obj["metadata"]["name"]] = (requests.get("nvidia.com/gpu"), limits.get("nvidia.com/gpu"))
    return out


@pytest.mark.parametrize("overlay", ["gpu", "keda", "external-redis"])
def test_gpu_overlays_ask_for_a_gpu_on_policy_value_and_trainer(overlay: str) -> None:
    assert gpus(overlay) == {name: ("1", "1") for name in GPU_WORKLOADS}
    for name in GPU_WORKLOADS:
        spec = pod_spec(find(render(overlay), "Deployment", name))
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_dev_cpu_asks_for_no_gpu() -> None:
    assert gpus("dev-cpu") == {}
    for obj in workloads(render("dev-cpu")):
        assert "tolerations" not in pod_spec(obj) and "nodeSelector" not in pod_spec(obj)
        for c in pod_spec(obj)["containers"]:
            assert c["image"].split(":")[0] != "cpl-serving", "the CUDA serving image on a CPU cluster"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits_and_runs_as_non_root(overlay: str) -> None:
    for obj in workloads(render(overlay)):
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            where = f"{overlay} {obj['metadata']['name']}/{c['name']}"
            assert c.get("image"), f"{where}: no image (a patch that added a container instead of changing one?)"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"].get(kind, {})), f"{where}: no {kind}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateways_probe_ready_and_health_and_survive_model_loading(overlay: str) -> None:
    objects = render(overlay)
    for name, port in GATEWAYS.items():
        deployment = find(objects, "Deployment", name)
        strategy = deployment["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxSurge"] == 0
        spec = pod_spec(deployment)
        (c,) = spec["containers"]
        assert c["ports"] == [{"name": "http", "containerPort": port}], "only the gateway's port, never vLLM's"
        startup = c["startupProbe"]
        assert startup["httpGet"]["path"] == "/ready"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loading takes ~10 min"
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"cpl-models", "cpl-checkpoints"}
        headless = find(objects, "Service", f"{name}-headless")["spec"]
        assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
        assert find(objects, "PodDisruptionBudget", name)["spec"]["maxUnavailable"] == 1


def test_gpu_gateways_get_more_shared_memory_than_dev() -> None:
    def shm(overlay: str) -> str:
        spec = pod_spec(find(render(overlay), "Deployment", "policy"))
        return next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"]

    assert (shm("gpu"), shm("dev-cpu")) == ("16Gi", "1Gi")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_search_workers_outlive_a_task_slice_on_shutdown(overlay: str) -> None:
    spec = pod_spec(find(render(overlay), "Deployment", "search-worker"))
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    # One slice plus 60 s for the last snapshot and the exit, docs/deploy.md.
    assert spec["terminationGracePeriodSeconds"] > float(env["CPL_SEARCH_SLICE_SECONDS"]) + 60


def test_redis_is_a_stateful_set_with_aof_and_noeviction() -> None:
    objects = render("gpu")
    redis = find(objects, "StatefulSet", "redis")
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    conf = find(objects, "ConfigMap", "redis-config")["data"]["redis.conf"].split("\n")
    assert {"appendonly yes", "maxmemory-policy noeviction", "dir /data"} <= set(conf)


def test_external_redis_overlay_has_no_redis_and_reads_the_url_from_a_secret() -> None:
    objects = render("external-redis")
    assert not [o for o in objects if o["metadata"]["name"] in ("redis", "redis-config")]
    for obj in workloads(objects):
        for c in pod_spec(obj)["containers"]:
            for e in c.get("env", []):
                if e["name"].endswith("_REDIS_URL"):
                    assert "value" not in e
                    assert e["valueFrom"]["secretKeyRef"] == {"name": "cpl-redis-url", "key": "url"}


def test_keda_scales_the_search_workers() -> None:
    scaled = find(render("keda"), "ScaledObject", "search-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "search-worker"
    assert scaled["triggers"][0]["type"] == "redis"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values_in_the_manifests(overlay: str) -> None:
    objects = render(overlay)
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created by the operator (docs/deploy.md)"
    for obj in workloads(objects):
        for c in pod_spec(obj)["containers"]:
            for e in c.get("env", []):
                if any(word in e["name"] for word in ("TOKEN", "KEY", "PASSWORD", "SECRET")):
                    assert e["name"].endswith("_FILE") or "valueFrom" in e, (overlay, e)


def allowed_sources(objects: tuple[dict[str, Any], ...], component: str, port: int) -> set[str]:
    """Components whose pods may open `port` on `component`'s pods under the rendered NetworkPolicies."""
    everyone = {"policy", "value", "search-api", "search-worker", "train-worker", "redis", "prometheus"}

    def selects(selector: dict[str, Any], comp: str) -> bool:
        labels = {"app.kubernetes.io/component": comp, "app.kubernetes.io/name": "cpl"}
        if comp == "prometheus":
            labels = {"app.kubernetes.io/name": "prometheus"}
        ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
        for expr in selector.get("matchExpressions", []):
            assert expr["operator"] == "In"
            ok = ok and labels.get(expr["key"]) in expr["values"]
        return ok

    sources: set[str] = set()
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies), "no default deny"
    for policy in policies:
        if not selects(policy["spec"]["podSelector"], component):
            continue
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
                continue
            if "from" not in rule:
                return everyone
            for peer in rule["from"]:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    sources |= {c for c in everyone if c != "prometheus" and selects(peer["podSelector"], c)}
                elif "podSelector" in peer:
                    sources |= {c for c in everyone if selects(peer["podSelector"], c)}
    return sources


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy(overlay: str) -> None:
    objects = render(overlay)
    clients = {"search-worker", "search-api", "train-worker"}
    for name, port in GATEWAYS.items():
        assert allowed_sources(objects, name, port) == clients | {"prometheus"}
        # vLLM's child listens on localhost; no other port of a gateway pod is open to anyone.
        assert allowed_sources(objects, name, 8000) == set()
    if any(o["kind"] == "StatefulSet" for o in objects):
        assert allowed_sources(objects, "redis", 6379) == clients
    for name in ("search-worker", "train-worker"):
        assert allowed_sources(objects, name, 8000) == set()


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(overlay: str) -> None:
    """What the schemas cannot see: every name one object uses for another exists in the same rendering
    (Secrets excepted: the operator creates them, docs/deploy.md)."""
    objects = render(overlay)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    pods = [(o, pod_spec(o)) for o in workloads(objects)]
    for obj, spec in pods:
        where = f"{overlay} {obj['kind']}/{obj['metadata']['name']}"
        assert labels_match(obj["spec"]["selector"]["matchLabels"], obj["spec"]["template"]["metadata"]["labels"])
        ports = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
        for c in spec["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in ports, f"{where}: {probe} on unknown port {port}"
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"] for v in spec.get("volumes", [])}
            templates = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
            assert mounts <= volumes | templates, f"{where}: mounts {mounts - volumes - templates} undefined"
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names, where
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names, where
    for svc in (o for o in objects if o["kind"] == "Service"):
        backends = [
            s for o, s in pods if labels_match(svc["spec"]["selector"], o["spec"]["template"]["metadata"]["labels"])
        ]
        assert backends, f"{overlay}: Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            named = {p["name"] for s in backends for c in s["containers"] for p in c.get("ports", [])}
            assert port["targetPort"] in named, f"{overlay}: Service {svc['metadata']['name']} port {port}"
    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(labels_match(selector, o["spec"]["template"]["metadata"]["labels"]) for o, _ in pods), pdb
    for obj in objects:
        if obj["kind"] == "ScaledObject":
            assert ("Deployment", obj["spec"]["scaleTargetRef"]["name"]) in names
        if obj["kind"] == "Ingress":
            for rule in obj["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    assert ("Service", path["backend"]["service"]["name"]) in names
        if obj["kind"] == "StatefulSet":
            assert ("Service", obj["spec"]["serviceName"]) in names

"""Acceptance 2: invariants of the rendered manifests that no schema can express: probes, limits,
security contexts, GPUs, termination grace against the drain grace, references that resolve,
network reachability, and settings that the services really read."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

from fovea.cluster import ROOT
from fovea.crypto import load_key
from fovea.tokens import TokenTable
from tests.deploy.manifests import (
    FIELDS,
    SERVICES,
    VARIANTS,
    Obj,
    config_data,
    container_env,
    container_ports,
    containers,
    find,
    fovea_workload,
    labels_match,
    one,
    pod_spec,
    prestop_sleep_s,
    workloads,
)


@pytest.fixture(params=VARIANTS)
def objs(request: pytest.FixtureRequest, rendered: dict[str, list[Obj]]) -> list[Obj]:
    return rendered[request.param]


def test_every_container_has_probes_limits_and_a_locked_down_security_context(objs: list[Obj]) -> None:
    assert list(workloads(objs))
    for w in workloads(objs):
        spec = pod_spec(w)
        pod_sc = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, w["metadata"]["name"]
        # Service links would put FOVEA_<SERVICE>_PORT=tcp://... into every pod, where the
        # services' own settings would read them.
        assert spec.get("enableServiceLinks") is False, w["metadata"]["name"]
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        for c in containers(w):
            where = f"{w['metadata']['name']}/{c['name']}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{where} has no {probe}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{where} {kind}"
            sc = {**pod_sc, **c.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True, where
            assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), where
            assert not sc.get("privileged"), where
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp, f"{where}: a read-only root needs a writable /tmp"
            volume = next(v for v in spec["volumes"] if v["name"] == tmp[0]["name"])
            assert "emptyDir" in volume and volume["emptyDir"].get("sizeLimit")


def test_fovea_services_use_native_grpc_probes_on_their_grpc_port(objs: list[Obj]) -> None:
    for service in SERVICES:
        c = containers(fovea_workload(objs, service))[0]
        port = container_ports(c)["grpc"]
        env = container_env(objs, c, FIELDS)
        assert int(env[f"{SERVICES[service]}PORT"]) == port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port, (service, probe)


def test_gpu_prod_workers_request_a_gpu_on_gpu_nodes(rendered: dict[str, list[Obj]]) -> None:
    for variant in ("gpu-prod", "gpu-prod+external-redis"):
        objs = rendered[variant]
        w = fovea_workload(objs, "worker")
        spec = pod_spec(w)
        c = spec["containers"][0]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert spec["nodeSelector"]
        assert any(t["key"] == "nvidia.com/gpu" and t.get("effect") == "NoSchedule" for t in spec["tolerations"])
        env = container_env(objs, c, FIELDS)
        assert env["FOVEA_WORKER_PROVIDERS"].split(",")[0] == "CUDAExecutionProvider"
        assert env["FOVEA_WORKER_REQUIRE_GPU"] == "true"  # a silent CPU fallback would be worse than a crash
        assert "worker-gpu" in c["image"]
    cpu = fovea_workload(rendered["cpu-dev"], "worker")
    c = pod_spec(cpu)["containers"][0]
    assert not any("nvidia.com/gpu" in c["resources"][k] for k in ("requests", "limits"))
    assert "nodeSelector" not in pod_spec(cpu) and "tolerations" not in pod_spec(cpu)
    assert container_env(rendered["cpu-dev"], c, FIELDS)["FOVEA_WORKER_PROVIDERS"] == "CPUExecutionProvider"
    assert "worker-cpu" in c["image"]


def test_termination_grace_covers_prestop_and_drain_grace(objs: list[Obj]) -> None:
    from fovea.config import BaseConfig
    from gateway.config import GatewayConfig
    from registry.config import RegistryConfig
    from worker.config import WorkerConfig

    defaults: dict[str, type[BaseConfig]] = {
        "registry": RegistryConfig,
        "worker": WorkerConfig,
        "gateway": GatewayConfig,
    }
    for service, prefix in SERVICES.items():
        w = fovea_workload(objs, service)
        c = pod_spec(w)["containers"][0]
        env = container_env(objs, c, FIELDS)
        grace_s = float(env.get(f"{prefix}GRACE_S", defaults[service].model_fields["grace_s"].default))
        budget = pod_spec(w)["terminationGracePeriodSeconds"]
        assert prestop_sleep_s(c) > 0, f"{service}: no preStop step"
        assert budget >= prestop_sleep_s(c) + grace_s + 1, (service, budget, grace_s)
    worker_env = container_env(objs, containers(fovea_workload(objs, "worker"))[0], FIELDS)
    assert float(worker_env["FOVEA_WORKER_GRACE_S"]) >= 10, "the worker's drain grace is set explicitly"


def test_every_object_lives_in_the_fovea_namespace(objs: list[Obj]) -> None:
    """Pods only see Secrets and ConfigMaps of their own namespace (an overlay's generated Secret
    does not inherit the base's namespace by itself)."""
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "fovea", f"{obj['kind']}/{obj['metadata']['name']}"


# Secret keys that hold a value only while a rotation is under way (deploy/README.md, "Rotate keys").
ROTATION_KEYS = {"previous-encryption-key"}
TOKEN_KEYS = ["admin-token", "worker-token", "gateway-token", "worker-call-token"]


def test_every_secret_configmap_and_volume_reference_resolves(objs: list[Obj]) -> None:
    def check(kind: str, name: str, keys: list[str], where: str, optional: bool = False) -> None:
        found = find(objs, kind, name)
        assert found, f"{where}: {kind}/{name} is not in the rendered output"
        data = config_data(objs, kind, name)
        for key in keys:
            # a rotation key may be empty between rotations, but never missing or misspelt
            may_be_empty = optional or key in ROTATION_KEYS
            assert key in data and (may_be_empty or data[key] != ""), f"{where}: {kind}/{name} has no key {key}"

    for w in workloads(objs):
        spec = pod_spec(w)
        for c in containers(w):
            where = f"{w['metadata']['name']}/{c['name']}"
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef") or src["secretRef"]
                check("ConfigMap" if "configMapRef" in src else "Secret", ref["name"], [], where)
            for var in c.get("env", []):
                ref = var.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    key_ref = ref["secretKeyRef"]
                    check("Secret", key_ref["name"], [key_ref["key"]], where, key_ref.get("optional", False))
                if "configMapKeyRef" in ref:
                    check("ConfigMap", ref["configMapKeyRef"]["name"], [ref["configMapKeyRef"]["key"]], where)
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])} | claims, where
        for v in spec.get("volumes", []):
            if "secret" in v:
                check("Secret", v["secret"]["secretName"], [i["key"] for i in v["secret"].get("items", [])], v["name"])
            if "configMap" in v:
                check(
                    "ConfigMap", v["configMap"]["name"], [i["key"] for i in v["configMap"].get("items", [])], v["name"]
                )
            if "persistentVolumeClaim" in v:
                assert find(objs, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
        assert spec["serviceAccountName"] in {o["metadata"]["name"] for o in find(objs, "ServiceAccount")}


def test_secrets_are_usable_by_the_services(rendered: dict[str, list[Obj]]) -> None:
    """The generated (gpu-prod) and committed (cpu-dev) secrets hold what the services expect."""
    for variant in VARIANTS:
        data = config_data(rendered[variant], "Secret", "fovea-secrets")
        for key in TOKEN_KEYS:
            assert len(data[key]) >= 32 and data[key].strip() == data[key], key
        # each kind of caller has its own token, and the registry and workers accept exactly those
        assert len({data[key] for key in TOKEN_KEYS}) == len(TOKEN_KEYS)
        for kind in ("admin", "worker", "gateway"):
            assert TokenTable({kind: data[f"registry-{kind}-tokens"]}).kind_of(data[f"{kind}-token"]) == kind
        assert data["worker-accepted-tokens"] == data["worker-call-token"]
        assert re.match(r"^(redis|rediss|redis\+sentinel)://", data["redis-url"])
    for variant in ("gpu-prod", "gpu-prod+external-redis"):
        data = config_data(rendered[variant], "Secret", "fovea-secrets")
        assert not any("dev-only" in data[key] for key in [*TOKEN_KEYS, "encryption-key"])
        # the registry holds digests only, not the tokens themselves
        assert all(data[f"registry-{k}-tokens"].startswith("sha256:") for k in ("admin", "worker", "gateway"))
        assert data["redis-password"] in data["redis-url"]


def test_encryption_keys_load(rendered: dict[str, list[Obj]], tmp_path: Any) -> None:
    for variant in VARIANTS:
        path = tmp_path / variant
        path.write_text(config_data(rendered[variant], "Secret", "fovea-secrets")["encryption-key"])
        assert len(load_key(path)) == 32


def test_every_fovea_setting_is_a_real_config_field_with_a_valid_value(
    objs: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A misspelt FOVEA_* name would be ignored silently (extra="ignore"); a bad value would crash."""
    from gateway.config import GatewayConfig
    from registry.config import RegistryConfig
    from worker.config import WorkerConfig

    classes: dict[str, Any] = {"registry": RegistryConfig, "worker": WorkerConfig, "gateway": GatewayConfig}
    for service, prefix in SERVICES.items():
        env = container_env(objs, containers(fovea_workload(objs, service))[0], FIELDS)
        fields = set(classes[service].model_fields)
        for name in env:
            if name.startswith("FOVEA_"):
                assert name.startswith(prefix), f"{service} sets {name}, which only another service reads"
                assert name[len(prefix) :].lower() in fields, f"{service}: {name} is not a setting"
        for name in list(os.environ):
            if name.startswith("FOVEA_") or name == "REDIS_URL":
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        config = classes[service]()
        if service == "registry":
            config.token_table()  # every list parses, and no token is listed for two kinds
        else:
            assert config.registry_token, f"{service} has no token for the registry"
        assert config.host == "0.0.0.0"
        if service == "worker":
            assert config.address(config.port) == f"{FIELDS['status.podIP']}:{config.port}"
            assert config.worker_id == FIELDS["metadata.name"]
        for name in env:
            monkeypatch.delenv(name)


def test_services_select_pods_and_name_their_ports(objs: list[Obj]) -> None:
    pods = [(w, w["spec"]["template"]["metadata"]["labels"]) for w in workloads(objs)]
    for svc in find(objs, "Service"):
        matched = [w for w, labels in pods if labels_match(svc["spec"]["selector"], labels)]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {len(matched)} workloads"
        ports = {name: n for c in containers(matched[0]) for name, n in container_ports(c).items()}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (svc["metadata"]["name"], port)
    exposed = [
        s["metadata"]["name"] for s in find(objs, "Service") if s["spec"].get("type") in ("LoadBalancer", "NodePort")
    ]
    assert exposed in ([], ["fovea-gateway"])


def test_disruption_budgets_and_autoscalers_target_real_workloads(objs: list[Obj]) -> None:
    for pdb in find(objs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(labels_match(sel, w["spec"]["template"]["metadata"]["labels"]) for w in workloads(objs))
    for service in SERVICES:
        assert find(objs, "PodDisruptionBudget", f"fovea-{service}")
    scaled = {}
    for hpa in find(objs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = one(objs, ref["kind"], ref["name"])
        # A replicas field would fight the autoscaler on every `kubectl apply`.
        assert "replicas" not in target["spec"], ref["name"]
        scaled[ref["name"]] = hpa["spec"]["metrics"]
    assert scaled["fovea-gateway"][0]["resource"]["name"] == "cpu"
    assert scaled["fovea-worker"][0]["pods"]["metric"]["name"] == "fovea_worker_queue_depth"


def test_worker_autoscaling_metric_exists_end_to_end() -> None:
    """HPA metric <- Prometheus Adapter rule <- the gauge the worker exports."""
    import yaml

    values = yaml.safe_load((ROOT / "deploy" / "k8s" / "prometheus-adapter-values.yaml").read_text())
    rule = values["rules"]["custom"][0]
    assert rule["name"]["as"] == "fovea_worker_queue_depth"
    assert rule["seriesQuery"].startswith("fovea_worker_queue_depth{")
    from worker.metrics import WorkerMetrics

    names = {m.name for m in WorkerMetrics().registry.collect()}
    assert "fovea_worker_queue_depth" in names


def test_metrics_are_scraped_from_the_port_the_services_serve_them_on(objs: list[Obj]) -> None:
    monitor = one(objs, "ServiceMonitor", "fovea")
    sel = monitor["spec"]["selector"]["matchLabels"]
    services = [s for s in find(objs, "Service") if labels_match(sel, s["metadata"].get("labels", {}))]
    assert {s["metadata"]["labels"]["app.kubernetes.io/name"] for s in services} == {"worker", "gateway"}
    for svc in services:
        name = svc["metadata"]["labels"]["app.kubernetes.io/name"]
        c = containers(fovea_workload(objs, name))[0]
        env = container_env(objs, c, FIELDS)
        assert int(env[f"{SERVICES[name]}METRICS_PORT"]) == container_ports(c)["metrics"]
        assert [p["name"] for p in svc["spec"]["ports"]] == ["metrics"] or name == "worker"


def test_registry_replicas_share_a_readwritemany_volume(objs: list[Obj]) -> None:
    registry = fovea_workload(objs, "registry")
    claim = next(
        v["persistentVolumeClaim"]["claimName"] for v in pod_spec(registry)["volumes"] if "persistentVolumeClaim" in v
    )
    modes = one(objs, "PersistentVolumeClaim", claim)["spec"]["accessModes"]
    if registry["spec"].get("replicas", 1) > 1:
        assert modes == ["ReadWriteMany"]
    else:
        assert registry["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "RWO cannot attach twice"
    env = container_env(objs, pod_spec(registry)["containers"][0], FIELDS)
    mount = next(
        m
        for m in pod_spec(registry)["containers"][0]["volumeMounts"]
        if m["name"] == next(v["name"] for v in pod_spec(registry)["volumes"] if "persistentVolumeClaim" in v)
    )
    assert env["FOVEA_REGISTRY_ARTIFACT_DIR"] == mount["mountPath"]


def test_redis_is_append_only_and_password_protected(rendered: dict[str, list[Obj]]) -> None:
    for variant in ("cpu-dev", "gpu-prod"):
        objs = rendered[variant]
        sts = one(objs, "StatefulSet", "fovea-redis")
        c = pod_spec(sts)["containers"][0]
        args = c["args"]
        assert args[args.index("--appendonly") + 1] == "yes"
        assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
        # The password goes to the server on stdin (test_hardening.py), never in its args.
        assert 'requirepass "$REDIS_PASSWORD"' in c["command"][2]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "data")
        assert args[args.index("--dir") + 1] == mount["mountPath"]
        assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
        data = config_data(objs, "Secret", "fovea-secrets")
        assert f":{data['redis-password']}@fovea-redis:6379" in data["redis-url"]
    assert not find(rendered["gpu-prod+external-redis"], "StatefulSet")
    assert not find(rendered["gpu-prod+external-redis"], "NetworkPolicy", "fovea-redis")


def test_worker_advertises_its_pod_ip(objs: list[Obj]) -> None:
    c = containers(fovea_workload(objs, "worker"))[0]
    env = container_env(objs, c, FIELDS)
    assert env["FOVEA_WORKER_ADVERTISE_ADDRESS"] == f"{FIELDS['status.podIP']}:{container_ports(c)['grpc']}"
    assert env["FOVEA_WORKER_WORKER_ID"] == FIELDS["metadata.name"]


def test_images_are_pinned(objs: list[Obj]) -> None:
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for w in workloads(objs):
        for c in containers(w):
            image = c["image"]
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag and re.match(r"^\d+\.\d+\.\d+", tag), image
            if c["name"] in SERVICES:
                assert tag == version, image


# ---- network policies -------------------------------------------------------------------------


def _allowed(objs: list[Obj], dest: str, port: int, source: dict[str, str] | None, source_ns: str) -> bool:
    """NetworkPolicy semantics for ingress: allowed when no policy selects the pod, or any rule of
    any selecting policy admits the source on that port. source None: outside the cluster."""
    dest_labels = (
        fovea_workload(objs, dest)["spec"]["template"]["metadata"]["labels"]
        if dest != "redis"
        else one(objs, "StatefulSet", "fovea-redis")["spec"]["template"]["metadata"]["labels"]
    )
    namespace = one(objs, "Namespace", "fovea")["metadata"]["name"]
    policies = [
        p
        for p in find(objs, "NetworkPolicy")
        if labels_match(p["spec"]["podSelector"].get("matchLabels", {}), dest_labels)
        and "Ingress" in p["spec"]["policyTypes"]
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and not any(p["port"] == port for p in rule["ports"]):
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                if source is None:
                    if "ipBlock" in peer:
                        return True
                    continue
                ns_ok = ("namespaceSelector" not in peer and source_ns == namespace) or (
                    "namespaceSelector" in peer
                    and labels_match(
                        peer["namespaceSelector"].get("matchLabels", {}), {"kubernetes.io/metadata.name": source_ns}
                    )
                )
                pod_ok = "podSelector" not in peer or labels_match(peer["podSelector"].get("matchLabels", {}), source)
                if ns_ok and pod_ok:
                    return True
    return False


def test_network_policies_admit_exactly_the_intended_paths(objs: list[Obj]) -> None:
    def labels(app: str) -> dict[str, str]:
        return {"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "fovea"}

    sources: dict[str, tuple[dict[str, str] | None, str]] = {
        "outside": (None, ""),
        "gateway": (labels("gateway"), "fovea"),
        "worker": (labels("worker"), "fovea"),
        "registry": (labels("registry"), "fovea"),
        "redis": (labels("redis"), "fovea"),
        "other-namespace": ({"app": "x"}, "default"),
        "prometheus": ({"app": "prometheus"}, "monitoring"),
    }
    grpc = {"gateway": 8500, "registry": 8501, "worker": 8502, "redis": 6379}
    want = {
        "gateway": {"outside", "gateway", "worker", "registry", "redis", "other-namespace", "prometheus"},
        "worker": {"gateway"},
        "registry": {"gateway", "worker"},
        "redis": {"registry", "gateway"},
    }
    has_redis = bool(find(objs, "StatefulSet", "fovea-redis"))
    for dest, port in grpc.items():
        if dest == "redis" and not has_redis:
            continue
        got = {name for name, (src, ns) in sources.items() if _allowed(objs, dest, port, src, ns)}
        assert got == want[dest], (dest, got)
    for dest in ("gateway", "worker"):
        got = {name for name, (src, ns) in sources.items() if _allowed(objs, dest, 9090, src, ns)}
        assert got == {"prometheus"}, (dest, got)

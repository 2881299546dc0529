"""Render the kustomize overlays and read them the way Kubernetes would: objects, env, probes.

Used by every test in tests/deploy. Rendering runs `kubectl kustomize` on a copy of deploy/k8s,
so that gpu-prod can get its secret files from deploy/k8s/make-secrets.sh as an operator would.
"""

from __future__ import annotations

import base64
import pathlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import yaml

from fovea.cluster import ROOT

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu-dev", "gpu-prod")
WORKLOADS = ("Deployment", "StatefulSet")
# The three Fovea services and their settings prefixes; Redis is the only other container.
SERVICES = {"registry": "FOVEA_REGISTRY_", "worker": "FOVEA_WORKER_", "gateway": "FOVEA_GATEWAY_"}

Obj = dict[str, Any]


def render(work_dir: pathlib.Path, overlay: str, components: tuple[str, ...] = ()) -> list[Obj]:
    """`kubectl kustomize` of one overlay (plus optional components), as a list of objects."""
    copy = work_dir / f"k8s-{overlay}-{len(components)}"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("secrets"))
    if overlay == "gpu-prod":
        subprocess.run(
            ["sh", str(copy / "make-secrets.sh"), str(copy / "overlays" / overlay / "secrets")],
            check=True,
            capture_output=True,
        )
    kustomization = copy / "overlays" / overlay / "kustomization.yaml"
    if components:
        doc = yaml.safe_load(kustomization.read_text())
        doc["components"] = [*doc.get("components", []), *(f"../../components/{c}" for c in components)]
        kustomization.write_text(yaml.safe_dump(doc))
    out = subprocess.run(
        ["kubectl", "kustomize", str(kustomization.parent)], check=True, capture_output=True, text=True, timeout=60
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(objs: list[Obj]) -> Iterator[Obj]:
    return (o for o in objs if o["kind"] in WORKLOADS)


def pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def containers(workload: Obj) -> list[Obj]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def fovea_workload(objs: list[Obj], service: str) -> Obj:
    return one(objs, "Deployment", f"fovea-{service}")


def secret_data(secret: Obj) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def config_data(objs: list[Obj], kind: str, name: str) -> dict[str, str]:
    obj = one(objs, kind, name)
    return secret_data(obj) if kind == "Secret" else dict(obj.get("data") or {})


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, others kept, $$ escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, value)


def container_env(objs: list[Obj], container: Obj, fields: dict[str, str]) -> dict[str, str]:
    """The environment Kubernetes gives a container: envFrom, then env in order, with $(VAR)
    expansion; fields answers downward-API fieldRefs (status.podIP, metadata.name)."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            data = config_data(objs, "ConfigMap", src["configMapRef"]["name"])
        else:
            data = config_data(objs, "Secret", src["secretRef"]["name"])
        env.update({prefix + k: v for k, v in data.items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        ref = var["valueFrom"]
        if "secretKeyRef" in ref:
            env[var["name"]] = config_data(objs, "Secret", ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            env[var["name"]] = config_data(objs, "ConfigMap", key["name"])[key["key"]]
        elif "fieldRef" in ref:
            env[var["name"]] = fields[ref["fieldRef"]["fieldPath"]]
        else:
            raise AssertionError(f"unsupported valueFrom in {var}")
    return env


def prestop_sleep_s(container: Obj) -> float:
    """Seconds a preStop hook waits: `sleep N` as exec, or the native sleep action."""
    hook = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    cmd = hook.get("exec", {}).get("command", [])
    if cmd[:1] == ["sleep"]:
        return float(cmd[1])
    return 0.0


def container_ports(container: Obj) -> dict[str, int]:
    return {p.get("name", str(p["containerPort"])): p["containerPort"] for p in container.get("ports", [])}


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a pod's labels."""
    if not labels_match(selector.get("matchLabels", {}), labels):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# The rendered variants the invariant tests check, and the downward-API values used to expand them.
VARIANTS = ["cpu-dev", "gpu-prod", "gpu-prod+external-redis"]
FIELDS = {"status.podIP": "10.0.0.7", "metadata.name": "pod-0"}

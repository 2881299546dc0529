"""Issue 18, fix 10, on the rendered manifests: Prometheus can scrape every service that serves
metrics, no secret is on any command line, and egress is denied except for the paths Fovea uses."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.deploy.manifests import (
    FIELDS,
    SERVICES,
    VARIANTS,
    Obj,
    config_data,
    container_env,
    container_ports,
    containers,
    expand,
    find,
    fovea_workload,
    labels_match,
    one,
    pod_spec,
    selector_matches,
    workloads,
)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture(params=VARIANTS)
def objs(request: pytest.FixtureRequest, rendered: dict[str, list[Obj]]) -> list[Obj]:
    return rendered[request.param]


def _listen_config(service: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The service's settings, built from the container's listening settings (host, ports) alone."""
    from gateway.config import GatewayConfig
    from registry.config import RegistryConfig
    from worker.config import WorkerConfig

    classes: dict[str, Any] = {"registry": RegistryConfig, "worker": WorkerConfig, "gateway": GatewayConfig}
    with monkeypatch.context() as m:
        for name in list(os.environ):
            if name.startswith("FOVEA_") or name == "REDIS_URL":
                m.delenv(name)
        for name, value in env.items():
            if name.removeprefix(SERVICES[service]) in ("HOST", "PORT", "METRICS_PORT", "METRICS_HOST"):
                m.setenv(name, value)
        return classes[service]()


# ---- metrics ------------------------------------------------------------------------------------


def test_every_metrics_endpoint_listens_where_prometheus_can_reach_it(
    objs: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each service with a metrics port binds it on every interface (a loopback bind answers only
    inside the pod), declares it as the container port "metrics", and a Service the ServiceMonitor
    selects points at it."""
    monitor = one(objs, "ServiceMonitor", "fovea")
    monitored = [
        s
        for s in find(objs, "Service")
        if labels_match(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}
    serving = set()
    for service in SERVICES:
        w = fovea_workload(objs, service)
        c = containers(w)[0]
        config = _listen_config(service, container_env(objs, c, FIELDS), monkeypatch)
        if config.metrics_port < 0:
            continue
        serving.add(service)
        host = getattr(config, "metrics_host", config.host)  # the worker serves metrics on its host
        assert host not in LOOPBACK, f"{service}: metrics listen on {host}, out of Prometheus's reach"
        assert container_ports(c).get("metrics") == config.metrics_port, service
        pod_labels = w["spec"]["template"]["metadata"]["labels"]
        scraped = [
            s
            for s in monitored
            if labels_match(s["spec"]["selector"], pod_labels)
            and any(p["name"] == "metrics" and p["targetPort"] == "metrics" for p in s["spec"]["ports"])
        ]
        assert scraped, f"{service}: no Service selected by the ServiceMonitor exposes its metrics port"
    # The registry has no metrics endpoint yet; workers and gateways must have theirs.
    assert serving == {"worker", "gateway"}


# ---- secrets on command lines -------------------------------------------------------------------


def _secret_env_names(container: Obj) -> set[str]:
    names = {v["name"] for v in container.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})}
    return names | {"*"} if any("secretRef" in s for s in container.get("envFrom", [])) else names


def test_no_password_or_token_on_any_command_line(objs: list[Obj]) -> None:
    """A container's command and args are its processes' argv, readable by anyone on the node
    (ps, /proc/PID/cmdline), and shown by `kubectl get pod -o yaml`: secrets go in env or files."""
    secrets = {
        value
        for s in find(objs, "Secret")
        for value in config_data(objs, "Secret", s["metadata"]["name"]).values()
        if len(value) >= 8
    }
    assert secrets
    for w in workloads(objs):
        for c in containers(w):
            where = f"{w['metadata']['name']}/{c['name']}"
            env = container_env(objs, c, FIELDS)
            from_secrets = _secret_env_names(c)
            for arg in [*c.get("command", []), *c.get("args", [])]:
                for name in from_secrets - {"*"}:
                    assert f"$({name})" not in arg, f"{where}: $({name}) puts a secret on the command line"
                expanded = expand(arg, env)
                assert not any(secret in expanded for secret in secrets), f"{where}: a secret in {arg!r}"


def test_redis_gets_its_password_on_stdin(rendered: dict[str, list[Obj]]) -> None:
    for variant in ("cpu-dev", "gpu-prod"):
        c = pod_spec(one(rendered[variant], "StatefulSet", "fovea-redis"))["containers"][0]
        assert "--requirepass" not in c["args"]
        shell, flag, script, name = c["command"]
        assert (shell, flag, name) == ("/bin/sh", "-c", "valkey-server")
        assert script.startswith('exec valkey-server - "$@" <<EOF\n')
        assert 'requirepass "$REDIS_PASSWORD"' in script.splitlines()
        assert any(v["name"] == "REDIS_PASSWORD" and "secretKeyRef" in v["valueFrom"] for v in c["env"])


# ---- egress -------------------------------------------------------------------------------------

Peer = tuple[dict[str, str] | None, str]  # (pod labels, namespace); None labels: outside the cluster


def _peer_matches(peer: Obj, dest: Peer, own_ns: str) -> bool:
    labels, ns = dest
    if "ipBlock" in peer:
        return labels is None  # ipBlocks are for addresses outside the cluster
    if labels is None:
        return False
    if "namespaceSelector" in peer:
        ns_ok = selector_matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": ns})
    else:
        ns_ok = ns == own_ns
    return ns_ok and ("podSelector" not in peer or selector_matches(peer["podSelector"], labels))


def _egress_allowed(objs: list[Obj], source: str, dest: Peer, port: int, protocol: str) -> bool:
    """NetworkPolicy semantics for egress: allowed when no policy with Egress selects the source
    pod, or any rule of any selecting policy admits the destination on that port and protocol."""
    w = fovea_workload(objs, source) if source != "redis" else one(objs, "StatefulSet", "fovea-redis")
    src_labels = w["spec"]["template"]["metadata"]["labels"]
    own_ns = one(objs, "Namespace", "fovea")["metadata"]["name"]
    policies = [
        p
        for p in find(objs, "NetworkPolicy")
        if "Egress" in p["spec"]["policyTypes"] and selector_matches(p["spec"]["podSelector"], src_labels)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            ports = rule.get("ports")
            if ports and not any(p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports):
                continue
            if "to" not in rule or any(_peer_matches(peer, dest, own_ns) for peer in rule["to"]):
                return True
    return False


def test_egress_is_denied_except_for_the_paths_fovea_uses(objs: list[Obj]) -> None:
    def app(name: str) -> Peer:
        return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "fovea"}, "fovea"

    in_cluster_redis = bool(find(objs, "StatefulSet", "fovea-redis"))
    # name -> (peer, port, protocol)
    dests: dict[str, tuple[Peer, int, str]] = {
        "gateway": (app("gateway"), 8500, "TCP"),
        "registry": (app("registry"), 8501, "TCP"),
        "worker": (app("worker"), 8502, "TCP"),
        "redis": (app("redis") if in_cluster_redis else (None, ""), 6379, "TCP"),
        "dns-udp": (({"k8s-app": "kube-dns"}, "kube-system"), 53, "UDP"),
        "dns-tcp": (({"k8s-app": "kube-dns"}, "kube-system"), 53, "TCP"),
        "internet": ((None, ""), 443, "TCP"),
        "kubernetes-api": ((None, ""), 6443, "TCP"),
        "other-namespace": (({"app": "x"}, "default"), 8080, "TCP"),
        "otlp-collector": (({"app": "otel-collector"}, "monitoring"), 4317, "TCP"),
    }
    dns = {"dns-udp", "dns-tcp"}
    want = {
        "gateway": {"registry", "worker", "redis"} | dns,
        "worker": {"registry"} | dns,
        "registry": {"redis"} | dns,
        "redis": set(),
    }
    for source, expected in want.items():
        if source == "redis" and not in_cluster_redis:
            continue
        got = {name for name, (peer, port, proto) in dests.items() if _egress_allowed(objs, source, peer, port, proto)}
        assert got == expected, (source, got)


def test_every_pod_is_under_a_default_deny_for_both_directions(objs: list[Obj]) -> None:
    deny = [
        p
        for p in find(objs, "NetworkPolicy")
        if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]
    assert deny and {"Ingress", "Egress"} <= {t for p in deny for t in p["spec"]["policyTypes"]}

"""`fovea status`: one screen with the cluster's state, from the registry and one gateway.

The registry knows the models, their aliases, the placement leader's decisions and every worker's last
heartbeat. Gateways do not heartbeat to the registry, so the only gateway shown is the one the command points
at (--address): its health check and its server metadata. --watch redraws every SECONDS; --json prints the same
facts as one JSON document (one per line with --watch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

DEFAULT_WATCH_S = 2.0
MIN_WATCH_S = 0.2
MAX_WATCH_S = 3600.0
MAX_TIMEOUT_S = 300.0
MAX_REASON = 60  # characters of a placement's reason in the table (--json has all of it)
CLEAR = "\x1b[2J\x1b[H"
GATEWAY_NOTE = "gateways do not heartbeat to the registry: only the gateway named by --address is checked"


def add_arguments(p: argparse.ArgumentParser, default_registry: str, default_gateway: str) -> None:
    p.add_argument("--registry", default=os.environ.get("FOVEA_REGISTRY", default_registry))
    p.add_argument(
        "--token",
        default="",
        help="admin API key or admin token for the registry (or FOVEA_API_KEY, FOVEA_ADMIN_TOKEN): listing "
        "workers needs the admin role",
    )
    p.add_argument("--address", default=os.environ.get("FOVEA_ADDRESS", default_gateway), help="the gateway to check")
    p.add_argument("--api-key", default="", help="API key for the gateway (default: FOVEA_API_KEY, else --token)")
    p.add_argument("--tls", action="store_true", help="connect to the gateway with TLS")
    p.add_argument("--tls-ca", default="", help="CA bundle for --tls (default: system roots)")
    p.add_argument("--timeout-s", type=float, default=5.0, help="deadline of each call")
    p.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=DEFAULT_WATCH_S,
        default=None,
        metavar="SECONDS",
        help=f"redraw every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C",
    )
    p.add_argument("--json", action="store_true", help="print a JSON document instead of the tables")


def _enum(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower() if value in enum.values() else str(value)


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def collect(args: argparse.Namespace, registry_token: str, gateway_key: str) -> dict[str, Any]:
    """The cluster's state as a plain document. Registry errors raise (grpc.RpcError); the gateway's are
    recorded in the document, since the registry's view is worth showing without it."""
    import grpc

    from fovea.client import RegistryClient
    from fovea.v1 import registry_pb2

    now = time.time()
    with RegistryClient(args.registry, registry_token, timeout_s=args.timeout_s) as rc:
        models = rc.list_models()
        workers = rc.list_workers()
        try:
            resp = rc.stub.ListPlacements(
                registry_pb2.ListPlacementsRequest(), metadata=rc.metadata, timeout=args.timeout_s
            )
            placements: dict[str, Any] | None = {p.scale.model: p for p in resp.placements}
            leader = resp.leader
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                raise
            placements, leader = None, ""  # a registry without placement: workers' own models only
    serving: dict[str, list[str]] = {}
    for w in workers:
        for m in w.models:
            if m.ready and w.state == registry_pb2.WORKER_STATE_READY and w.worker_id not in serving.get(m.name, []):
                serving.setdefault(m.name, []).append(w.worker_id)
    doc: dict[str, Any] = {
        "taken_at": _iso(now),
        "registry": {
            "address": args.registry,
            "placement": placements is not None,
            "placement_leader": leader or None,
        },
        "models": [_model(m, placements, serving) for m in models],
        "workers": [_worker(w, now) for w in workers],
        "gateway": gateway_state(args, gateway_key),
    }
    return doc


def _model(m: Any, placements: dict[str, Any] | None, serving: dict[str, list[str]]) -> dict[str, Any]:
    from fovea.v1 import registry_pb2

    out: dict[str, Any] = {
        "name": m.name,
        "latest_version": m.latest_version,
        "aliases": [
            {"name": a.name, "targets": [{"version": t.version, "weight": t.weight} for t in a.targets]}
            for a in m.aliases
        ],
        "ready_workers": sorted(serving.get(m.name, [])),
        "placement": None,
    }
    p = None if placements is None else placements.get(m.name)
    if p is not None:
        out["placement"] = {
            "state": _enum(registry_pb2.PlacementState, p.state, "PLACEMENT_STATE_"),
            "target_replicas": p.target_replicas,
            "replicas": p.scale.replicas,
            "min_replicas": p.scale.min_replicas,
            "max_replicas": p.scale.max_replicas,
            "pool": dict(p.scale.pool),
            "worker_ids": list(p.worker_ids),
            "ready_worker_ids": list(p.ready_worker_ids),
            "reason": p.reason,
        }
    return out


def _worker(w: Any, now: float) -> dict[str, Any]:
    from fovea.v1 import registry_pb2

    beat = w.updated_at.ToNanoseconds() / 1e9 if w.HasField("updated_at") else None
    providers = sorted({m.provider for m in w.models if m.provider})
    return {
        "worker_id": w.worker_id,
        "address": w.address,
        "state": _enum(registry_pb2.WorkerState, w.state, "WORKER_STATE_"),
        "provider": ",".join(providers) or None,
        "device": {"kind": w.device.kind, "name": w.device.name, "memory_bytes": w.device.memory_bytes},
        "pooled": w.pooled,
        "labels": dict(w.labels),
        "models": [
            {
                "name": m.name,
                "version": m.version,
                "ready": m.ready,
                "provider": m.provider,
                "queue_depth": m.queue_depth,
                "requests": m.requests,
            }
            for m in w.models
        ],
        "queue_depth": w.queue_depth,
        "in_flight": w.in_flight,
        "heartbeat_at": _iso(beat) if beat is not None else None,
        "heartbeat_age_s": round(max(0.0, now - beat), 1) if beat is not None else None,
    }


def gateway_state(args: argparse.Namespace, api_key: str) -> dict[str, Any]:
    """The named gateway's health (grpc.health.v1, no key needed) and server metadata (needs an API key)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from inference import grpc_predict_v2_pb2 as pb
    from inference import grpc_predict_v2_pb2_grpc as pb_grpc

    out: dict[str, Any] = {"address": args.address, "health": None, "server": None, "error": None, "note": GATEWAY_NOTE}
    if args.tls:
        ca = open(args.tls_ca, "rb").read() if args.tls_ca else None
        channel = grpc.secure_channel(args.address, grpc.ssl_channel_credentials(ca))
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        try:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=args.timeout_s
            )
            out["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status).lower()
        except grpc.RpcError as exc:
            out["health"] = "unreachable"
            out["error"] = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
            return out
        if not api_key:
            out["error"] = "no API key for the gateway's server metadata: pass --api-key or set FOVEA_API_KEY"
            return out
        md = (("authorization", f"Bearer {api_key}"),)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            meta = stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=md, timeout=args.timeout_s)
            ready = stub.ServerReady(pb.ServerReadyRequest(), metadata=md, timeout=args.timeout_s)
            out["server"] = {
                "name": meta.name,
                "version": meta.version,
                "extensions": list(meta.extensions),
                "ready": ready.ready,
            }
        except grpc.RpcError as exc:
            out["error"] = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return out


def _targets(alias: dict[str, Any]) -> str:
    targets = alias["targets"]
    if not targets:
        return "none"
    if len(targets) == 1:
        return f"v{targets[0]['version']}"
    return ", ".join(f"v{t['version']} {t['weight']}%" for t in targets)


def _table(rows: list[list[Any]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


def _placement(m: dict[str, Any], placement_on: bool) -> str:
    p = m["placement"]
    if p is None:
        return "-" if placement_on else "n/a"
    text = f"{p['state']} {len(p['ready_worker_ids'])}/{p['target_replicas']}"
    reason = p["reason"] if len(p["reason"]) <= MAX_REASON else p["reason"][: MAX_REASON - 3] + "..."
    return f"{text} ({reason})" if reason else text


def render(doc: dict[str, Any]) -> str:
    reg = doc["registry"]
    leader = (
        f"placement leader {reg['placement_leader']}"
        if reg["placement_leader"]
        else ("no placement leader" if reg["placement"] else "no placement on this registry")
    )
    lines = [f"Fovea cluster: registry {reg['address']} ({leader}), at {doc['taken_at']}", ""]
    models = [
        [
            m["name"],
            m["latest_version"],
            "; ".join(f"{a['name']} -> {_targets(a)}" for a in m["aliases"]) or "-",
            _placement(m, reg["placement"]),
            ", ".join(m["ready_workers"]) or "none",
        ]
        for m in doc["models"]
    ]
    lines += _table(models, ["MODEL", "LATEST", "ALIASES", "PLACEMENT", "READY ON"]) if models else ["no models"]
    lines.append("")
    workers = [
        [
            w["worker_id"],
            w["state"],
            w["provider"] or "-",
            f"{w['device']['kind'] or '?'} {w['device']['name']}".strip(),
            ", ".join(f"{m['name']} v{m['version']}{'' if m['ready'] else ' (loading)'}" for m in w["models"]) or "-",
            w["queue_depth"],
            w["in_flight"],
            "-" if w["heartbeat_age_s"] is None else f"{w['heartbeat_age_s']:.1f}s ago",
        ]
        for w in doc["workers"]
    ]
    header = ["WORKER", "STATE", "PROVIDER", "DEVICE", "MODELS", "QUEUE", "IN FLIGHT", "HEARTBEAT"]
    lines += _table(workers, header) if workers else ["no workers"]
    lines.append("")
    g = doc["gateway"]
    server = g["server"]
    text = f"gateway {g['address']}: health {g['health']}"
    if server:
        text += f", {'ready' if server['ready'] else 'not ready'}, {server['name']} {server['version']}"
        text += f" ({', '.join(server['extensions'])})"
    if g["error"]:
        text += f"; {g['error']}"
    lines += [text, f"({g['note']})"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of `fovea status` (grpc errors are reported by the caller, fovea.cli)."""
    if args.watch is not None and not MIN_WATCH_S <= args.watch <= MAX_WATCH_S:
        print(f"fovea: --watch takes {MIN_WATCH_S:g} to {MAX_WATCH_S:g} seconds, got {args.watch:g}", file=sys.stderr)
        return 2
    if not 0 < args.timeout_s <= MAX_TIMEOUT_S:
        print(f"fovea: --timeout-s takes (0, {MAX_TIMEOUT_S:g}] seconds, got {args.timeout_s:g}", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("FOVEA_API_KEY") or os.environ.get("FOVEA_ADMIN_TOKEN", "")
    if not token:
        print(
            "fovea: no credentials: pass --token (an admin API key or the admin token) or set FOVEA_API_KEY",
            file=sys.stderr,
        )
        return 2
    api_key = args.api_key or os.environ.get("FOVEA_API_KEY") or (token if token.startswith("fv_") else "")
    try:
        while True:
            doc = collect(args, token, api_key)
            if args.json:
                print(json.dumps(doc) if args.watch is not None else json.dumps(doc, indent=2), flush=True)
            else:
                print((CLEAR if args.watch is not None else "") + render(doc), flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0

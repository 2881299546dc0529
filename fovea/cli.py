"""The `fovea` command: run a local cluster, classify images, manage models and keys, train.

Subcommands load their modules lazily, so `fovea classify` never imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any

from fovea import codegen

DEFAULT_GATEWAY = "127.0.0.1:8500"
DEFAULT_REGISTRY = "127.0.0.1:8501"


def _fail(message: str) -> int:
    print(f"fovea: {message}", file=sys.stderr)
    return 2


def _grpc_errors(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        import grpc

        try:
            return int(fn(args) or 0)
        except grpc.RpcError as exc:
            return _fail(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]

    return run


# ---- classify ------------------------------------------------------------


@_grpc_errors
def cmd_classify(args: argparse.Namespace) -> int:
    from fovea.client import Client

    if not args.api_key:
        return _fail("no API key: pass --api-key or set FOVEA_API_KEY")
    images = [pathlib.Path(p).read_bytes() for p in args.images]
    with Client(
        args.address, args.api_key, timeout_s=args.timeout_s, tls_ca_file=args.tls_ca if args.tls else None
    ) as client:
        resp = client.classify(images, model=args.model, top_k=args.top_k, version=args.version, alias=args.alias)
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(resp), indent=2))
        return 0
    for path, result in zip(args.images, resp.results, strict=False):
        print(f"{path}  ({resp.model} v{resp.version})")
        for label in result.labels:
            print(f"  {label.score:7.4f}  {label.label}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from fovea.client import Client
    from fovea.explain import explain, save_overlay

    if not args.api_key:
        return _fail("no API key: pass --api-key or set FOVEA_API_KEY")
    image = pathlib.Path(args.image).read_bytes()
    out = args.out or str(pathlib.Path(args.image).with_suffix("")) + ".saliency.png"
    with Client(
        args.address, args.api_key, timeout_s=args.timeout_s, tls_ca_file=args.tls_ca if args.tls else None
    ) as client:
        sal = explain(client, image, args.model, version=args.version, alias=args.alias, grid=args.grid)
    save_overlay(out, image, sal)
    peak_y, peak_x = (int(v) for v in divmod(int(sal.heat.argmax()), sal.heat.shape[1]))
    if args.json:
        print(
            json.dumps(
                {
                    "model": sal.model,
                    "version": sal.version,
                    "label": sal.label,
                    "index": sal.index,
                    "score": sal.score,
                    "windows": sal.windows,
                    "max_drop": float(sal.heat.max()),
                    "peak_xy": [peak_x, peak_y],
                    "overlay": out,
                }
            )
        )
        return 0
    print(f"{args.image}: {sal.label} ({sal.score:.4f}), {sal.model} v{sal.version}")
    print(
        f"hiding the area around x={peak_x}, y={peak_y} lowers that score most, by {sal.heat.max():.4f} "
        f"({sal.windows} occluded copies)"
    )
    print(f"saliency overlay: {out}")
    return 0


# ---- models and keys -----------------------------------------------------


def _registry(args: argparse.Namespace) -> Any:
    from fovea.client import RegistryClient

    token = args.token or os.environ.get("FOVEA_API_KEY") or os.environ.get("FOVEA_ADMIN_TOKEN", "")
    if not token:
        raise SystemExit(_fail("no credentials: pass --token (an admin or publish API key) or set FOVEA_API_KEY"))
    return RegistryClient(args.registry, token)


def _print_table(rows: list[list[Any]], header: list[str]) -> None:
    columns = zip(header, *rows, strict=False) if rows else ([h] for h in header)
    widths = [max(len(str(x)) for x in col) for col in columns]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip())


def _dict(message: Any) -> Any:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


def _dump(data: Any) -> int:
    """Print messages (or lists and dicts of them) as JSON with the proto's field names."""

    def convert(x: Any) -> Any:
        if isinstance(x, list):
            return [convert(i) for i in x]
        if isinstance(x, dict):
            return {k: convert(v) for k, v in x.items()}
        return _dict(x) if hasattr(x, "DESCRIPTOR") else x

    print(json.dumps(convert(data), indent=2))
    return 0


def _targets(alias: Any) -> str:
    if alias is None or not alias.targets:
        return "none"
    if len(alias.targets) == 1:
        return f"v{alias.targets[0].version}"
    return ", ".join(f"v{t.version} {t.weight}%" for t in alias.targets)


def _when(ts: Any) -> str:
    return ts.ToDatetime().isoformat(timespec="seconds") if ts.seconds else "-"


@_grpc_errors
def cmd_model(args: argparse.Namespace) -> int:
    from fovea.v1 import model_pb2

    if args.action == "import-pretrained":
        from training.cli import import_pretrained_main

        return import_pretrained_main(args.rest)
    if args.action == "export":
        from training.cli import export_main

        return export_main(args.rest)
    if args.action == "promote" and bool(args.canary) != bool(args.canary_weight):
        return _fail("--canary VERSION and --canary-weight PERCENT (1-99) go together")
    rc = _registry(args)
    if args.action == "list":
        models = rc.list_models()
        placed = _placements(rc)
        if args.json:
            return _dump([{**_dict(m), "placement": _dict(placed[m.name])} if m.name in placed else m for m in models])
        _print_table(
            [
                [
                    m.name,
                    m.latest_version,
                    *_placed_columns(placed.get(m.name)),
                    "; ".join(f"{a.name} -> {_targets(a)}" for a in m.aliases) or "-",
                ]
                for m in models
            ],
            ["MODEL", "LATEST", "READY", "STATE", "WORKERS", "ALIASES"],
        )
    elif args.action == "scale":
        return _scale(rc, args)
    elif args.action == "show":
        versions = rc.list_versions(args.name)
        aliases: Any = next((m.aliases for m in rc.list_models() if m.name == args.name), [])
        placement = _placements(rc, args.name).get(args.name)
        if args.json:
            return _dump(
                {
                    "name": args.name,
                    "versions": versions,
                    "aliases": list(aliases),
                    **({"placement": placement} if placement is not None else {}),
                }
            )
        _print_table(
            [
                [
                    v.version,
                    model_pb2.VersionState.Name(v.state).removeprefix("VERSION_STATE_").lower(),
                    v.sha256[:12],
                    v.size_bytes,
                    len(v.labels),
                    " ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items())) or "-",
                    v.published_by,
                    _when(v.created_at),
                ]
                for v in versions
            ],
            ["VERSION", "STATE", "SHA256", "BYTES", "LABELS", "METRICS", "PUBLISHED BY", "CREATED"],
        )
        if aliases:
            print()
            _print_table([[a.name, _targets(a), _when(a.updated_at)] for a in aliases], ["ALIAS", "TARGETS", "UPDATED"])
        if placement is not None:
            print()
            _print_placement(placement)
    elif args.action == "register":
        mv = model_pb2.ModelVersion(name=args.name)
        for item in args.metric or []:
            k, _, v = item.partition("=")
            try:
                mv.metrics[k] = float(v)
            except ValueError:
                return _fail(f"--metric takes NAME=NUMBER, got {item!r}")
        for item in args.tag or []:
            k, _, v = item.partition("=")
            mv.tags[k] = v
        if args.model_card:
            mv.model_card = pathlib.Path(args.model_card).read_text()
        out = rc.register(args.file, mv, progress=not args.json)
        promoted = rc.set_alias(out.name, args.promote, [(out.version, 100)]) if args.promote else None
        if args.json:
            return _dump({"model": out, **({"alias": promoted.alias} if promoted else {})})
        print(f"registered {out.name} v{out.version} sha256={out.sha256} ({out.size_bytes} bytes)")
        if promoted:
            print(
                f"{out.name}/{args.promote}: {_targets(promoted.previous if promoted.HasField('previous') else None)}"
                f" -> {_targets(promoted.alias)}"
            )
    elif args.action == "promote":
        targets = (
            [(args.version, 100)]
            if not args.canary
            else [(args.version, 100 - args.canary_weight), (args.canary, args.canary_weight)]
        )
        resp = rc.set_alias(args.name, args.alias, targets)
        if args.json:
            return _dump(resp)
        prev = resp.previous if resp.HasField("previous") else None
        print(f"{args.name}/{args.alias}: {_targets(prev)} -> {_targets(resp.alias)}")
    elif args.action == "rollback":
        resp = rc.rollback_alias(args.name, args.alias)
        if args.json:
            return _dump(resp)
        prev = resp.previous if resp.HasField("previous") else None
        print(f"{args.name}/{args.alias} rolled back: {_targets(prev)} -> {_targets(resp.alias)}")
    elif args.action == "archive":
        mv = rc.archive(args.name, args.version)
        if args.json:
            return _dump(mv)
        print(f"archived {mv.name} v{mv.version}")
    elif args.action == "reencrypt":
        done = rc.reencrypt_artifacts()
        if args.json:
            return _dump(done)
        print(f"re-encrypted {done.rewritten} artifact(s); {done.unchanged} already under the current key")
        if done.unreadable:
            print(f"{len(done.unreadable)} artifact(s) no configured key opens, left as they were:", file=sys.stderr)
            for digest in done.unreadable:
                print(f"  {digest}", file=sys.stderr)
            return 1
    return 0


# ---- placement (issue 22) --------------------------------------------------


def _placements(rc: Any, model: str = "") -> dict[str, Any]:
    """Each model's placement by name; empty when the registry has no placement (an older one)."""
    import grpc

    try:
        placements, _leader = rc.list_placements(model)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
            return {}
        raise
    return {p.scale.model: p for p in placements}


def _state(placement: Any) -> str:
    from fovea.v1 import registry_pb2

    return registry_pb2.PlacementState.Name(placement.state).removeprefix("PLACEMENT_STATE_").lower()


def _placed_columns(placement: Any) -> list[str]:
    """READY (ready replicas / target), STATE, WORKERS of `model list`."""
    if placement is None:
        return ["-", "-", "-"]
    workers = ",".join(placement.worker_ids) or "-"
    return [f"{len(placement.ready_worker_ids)}/{placement.target_replicas}", _state(placement), workers]


def _print_placement(p: Any) -> None:
    s = p.scale
    pool = ",".join(f"{k}={v}" for k, v in sorted(s.pool.items())) or "any worker"
    ready = set(p.ready_worker_ids)
    print(f"placement: {_state(p)}, {len(ready)} of {p.target_replicas} replica(s) ready")
    print(f"  scale: replicas {s.replicas} (min {s.min_replicas}, max {s.max_replicas}), pool {pool}", end="")
    print(f", idle unload {s.idle_unload_s:g} s" if s.idle_unload_s else "")
    if p.memory_bytes:
        declared = f" (declared {s.memory_bytes / 1e6:.1f} MB per version)" if s.memory_bytes else ""
        print(f"  memory per replica: {p.memory_bytes / 1e6:.1f} MB{declared}")
    for wid in p.worker_ids:
        print(f"  {wid}: {'ready' if wid in ready else 'loading'}")
    if p.reason:
        print(f"  reason: {p.reason}")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _bytes(text: str) -> int | None:
    """'300MB', '2GiB', '1.5GB' or '5000000' as bytes; None when it is not a size."""
    number = text.strip().rstrip("bBiIkKmMgG")
    unit = text.strip()[len(number) :].upper()
    try:
        value = float(number)
    except ValueError:
        return None
    if unit not in _UNITS or not 0 <= value < 1e18:  # also refuses NaN and inf
        return None
    return int(value * _UNITS[unit])


def _scale(rc: Any, args: argparse.Namespace) -> int:
    from fovea.v1 import registry_pb2

    if args.replicas < 0 or (args.min is not None and args.min < 0) or (args.max is not None and args.max < 0):
        return _fail("--replicas, --min and --max take whole numbers of replicas, 0 or more")
    low = args.replicas if args.min is None else args.min
    high = max(args.replicas, low, 1) if args.max is None else args.max
    if not low <= args.replicas <= high:
        return _fail(f"--min {low} <= --replicas {args.replicas} <= --max {high} does not hold")
    memory = {}
    for flag, value in (("--memory", args.memory), ("--device-memory", args.device_memory)):
        size = 0 if value is None else _bytes(value)
        if size is None:
            return _fail(f"{flag} takes a size such as 300MB, 2GiB or 5000000, got {value!r}")
        memory[flag] = size
    scale = registry_pb2.ModelScale(
        model=args.name,
        replicas=args.replicas,
        min_replicas=low,
        max_replicas=high,
        idle_unload_s=args.idle_unload,
        memory_bytes=memory["--memory"],
        device_memory_bytes=memory["--device-memory"],
    )
    for item in args.pool or []:
        k, sep, v = item.partition("=")
        if not sep or not k or not v:
            return _fail(f"--pool takes LABEL=VALUE, got {item!r}")
        scale.pool[k] = v
    placement = rc.scale(scale)
    if args.json:
        return _dump(placement)
    print(f"{args.name}: {args.replicas} replica(s) wanted (min {low}, max {high})")
    _print_placement(placement)
    return 0


@_grpc_errors
def cmd_keys(args: argparse.Namespace) -> int:
    import time

    from fovea.v1 import registry_pb2

    rc = _registry(args)
    if args.action == "create":
        key, secret = rc.create_key(
            args.role, args.model or [], args.ttl_s, args.description, args.rps, args.ips, args.burst
        )
        if args.json:
            return _dump({"key_id": key.key_id, "secret": secret, "key": key})
        print(f"key id: {key.key_id}\nsecret: {secret}\n(the secret is shown only once; store it now)")
    elif args.action == "list":
        keys = rc.list_keys()
        if args.json:
            return _dump(keys)

        def state(k: Any) -> str:
            if k.revoked:
                return "revoked"
            return (
                "expired" if k.HasField("expires_at") and k.expires_at.ToNanoseconds() <= time.time_ns() else "active"
            )

        _print_table(
            [
                [
                    k.key_id,
                    registry_pb2.Role.Name(k.role).removeprefix("ROLE_").lower(),
                    ",".join(k.model_patterns) or "*",
                    state(k),
                    _when(k.expires_at) if k.HasField("expires_at") else "never",
                    _when(k.created_at),
                    k.description or "-",
                ]
                for k in keys
            ],
            ["KEY ID", "ROLE", "MODELS", "STATE", "EXPIRES", "CREATED", "DESCRIPTION"],
        )
    elif args.action == "revoke":
        k = rc.revoke_key(args.key_id)
        if args.json:
            return _dump(k)
        print(f"revoked {k.key_id}")
    return 0


# ---- status --------------------------------------------------------------


@_grpc_errors
def cmd_status(args: argparse.Namespace) -> int:
    from fovea.status import run

    return run(args)


# ---- local cluster -------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from fovea.up import up

    return up(args)


def _delegate(module: str, func: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), func)(args.rest) or 0)

    return run


# Commands whose own parsers live in their packages; their flags pass through untouched.
DELEGATED = {
    "train": ("training.cli", "train_main", "train a classifier"),
    "evaluate": ("training.cli", "evaluate_main", "evaluate a checkpoint or ONNX model"),
    "publish": ("training.cli", "publish_main", "register a trained model with the registry"),
    "loadtest": ("loadtest.cli", "main", "load-test a gateway, a worker or any Open Inference Protocol server"),
}
MODEL_DELEGATED = {
    "import-pretrained": ("training.cli", "import_pretrained_main"),
    "export": ("training.cli", "export_main"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fovea", description="Fovea: image recognition as a service.")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole cluster locally (Redis, registry, worker, gateway)")
    up.add_argument("--data-dir", default="var/fovea", help="where Redis data, artifacts and logs live")
    up.add_argument("--gateway-port", type=int, default=8500, help="the gateway's one gRPC port, for every call")
    up.add_argument("--registry-port", type=int, default=8501)
    up.add_argument(
        "--http-port",
        type=int,
        default=-1,
        help="the gateway's HTTP/REST port (KServe v2 REST, /v1/models/NAME:classify); 0 picks a free one, -1 off",
    )
    up.add_argument("--workers", type=int, default=1, help="pool workers: each serves what placement assigns it")
    up.add_argument(
        "--model",
        default="efficientnet-lite0",
        help="model published when the registry lacks it (only the default can be) and used by --demo; "
        "the workers serve every published model",
    )
    up.add_argument(
        "--demo", action="store_true", help="classify the sample photos once the cluster is ready, then stop"
    )
    up.set_defaults(func=cmd_up)

    def gateway_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--address", default=os.environ.get("FOVEA_ADDRESS", DEFAULT_GATEWAY))
        q.add_argument("--api-key", default=os.environ.get("FOVEA_API_KEY", ""))
        q.add_argument("--model", default=os.environ.get("FOVEA_MODEL", "efficientnet-lite0"))
        q.add_argument("--version", type=int, default=0)
        q.add_argument("--alias", default="")
        q.add_argument("--timeout-s", type=float, default=30.0)
        q.add_argument("--tls", action="store_true", help="connect with TLS")
        q.add_argument("--tls-ca", default="", help="CA bundle for --tls (default: system roots)")
        q.add_argument("--json", action="store_true")

    c = sub.add_parser("classify", help="classify images through a gateway")
    c.add_argument("images", nargs="+")
    c.add_argument("--top-k", type=int, default=5)
    gateway_flags(c)
    c.set_defaults(func=cmd_classify)

    e = sub.add_parser("explain", help="occlusion saliency of a served model's top class, as a PNG overlay")
    e.add_argument("image")
    e.add_argument("--out", default="", help="PNG to write (default: IMAGE.saliency.png)")
    e.add_argument("--grid", type=int, default=8, help="grid cells per side; (grid-1)^2 occluded copies are sent")
    gateway_flags(e)
    e.set_defaults(func=cmd_explain)

    def registry_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--registry", default=os.environ.get("FOVEA_REGISTRY", DEFAULT_REGISTRY))
        q.add_argument("--token", default="", help="API key with the publish or admin role (or FOVEA_API_KEY)")
        q.add_argument("--json", action="store_true")

    m = sub.add_parser(
        "model",
        help="register, list, show, promote, rollback, scale, archive, reencrypt, export, import-pretrained",
    )
    msub = m.add_subparsers(dest="action", required=True)
    registry_flags(msub.add_parser("list", help="models with their latest version, placement and aliases"))
    s = msub.add_parser("show", help="a model's versions, aliases and placement")
    s.add_argument("name")
    registry_flags(s)
    r = msub.add_parser("register", help="upload an ONNX file as the model's next version")
    r.add_argument("name")
    r.add_argument("file", help="ONNX file (labels and preprocessing come from its fovea.* metadata)")
    r.add_argument("--metric", action="append", help="NAME=VALUE")
    r.add_argument("--tag", action="append", help="KEY=VALUE")
    r.add_argument("--model-card", help="markdown file")
    r.add_argument("--promote", default="", help="point this alias at the new version")
    registry_flags(r)
    pr = msub.add_parser("promote", help="point an alias at a version, optionally with a canary")
    pr.add_argument("name")
    pr.add_argument("version", type=int)
    pr.add_argument("--alias", default="production")
    pr.add_argument("--canary", type=int, default=0, help="second version to send some traffic to")
    pr.add_argument("--canary-weight", type=int, default=0, help="percent of traffic for --canary (1-99)")
    registry_flags(pr)
    rb = msub.add_parser("rollback", help="point an alias back where it was before its last change")
    rb.add_argument("name")
    rb.add_argument("--alias", default="production")
    registry_flags(rb)
    sc = msub.add_parser("scale", help="how many ready replicas of a model the cluster keeps, and on which workers")
    sc.add_argument("name")
    sc.add_argument("--replicas", type=int, required=True, help="ready replicas wanted; 0 loads it on first use")
    sc.add_argument("--min", type=int, default=None, help="fewest replicas when idle (default: --replicas)")
    sc.add_argument("--max", type=int, default=None, help="most replicas under load (default: --replicas, at least 1)")
    sc.add_argument("--pool", action="append", help="LABEL=VALUE a worker must carry (repeatable), e.g. gpu=h100")
    sc.add_argument(
        "--idle-unload", type=float, default=0.0, help="seconds idle before a 0-replica model unloads (0: default)"
    )
    sc.add_argument(
        "--memory",
        help="host memory to plan for per loaded version, e.g. 300MB or 2GiB (placement takes the larger of this "
        "and what workers measure; default: measured, estimated from the artifact until then)",
    )
    sc.add_argument("--device-memory", help="the same for device memory, on workers with a device budget")
    registry_flags(sc)
    a = msub.add_parser("archive", help="archive a version no alias points at")
    a.add_argument("name")
    a.add_argument("version", type=int)
    registry_flags(a)
    registry_flags(
        msub.add_parser(
            "reencrypt",
            help="rewrite every artifact under the registry's current "
            "encryption key (the end of a key rotation; admin)",
        )
    )
    for name in ("import-pretrained", "export"):
        q = msub.add_parser(name, add_help=False)
        q.add_argument("rest", nargs=argparse.REMAINDER)
    m.set_defaults(func=cmd_model)

    k = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = k.add_subparsers(dest="action", required=True)
    kc = ksub.add_parser("create")
    kc.add_argument("--role", choices=["infer", "publish", "admin"], default="infer")
    kc.add_argument("--model", action="append", help="model-name glob the key may use (repeatable)")
    kc.add_argument("--ttl-s", type=int, default=0, help="expiry in seconds; 0 = never")
    kc.add_argument("--description", default="")
    kc.add_argument("--rps", type=float, default=0, help="requests per second; 0 = unlimited")
    kc.add_argument("--ips", type=float, default=0, help="images per second; 0 = unlimited")
    kc.add_argument("--burst", type=float, default=0, help="burst size; 0 = one second's worth")
    registry_flags(kc)
    registry_flags(ksub.add_parser("list"))
    kr = ksub.add_parser("revoke")
    kr.add_argument("key_id")
    registry_flags(kr)
    k.set_defaults(func=cmd_keys)

    from fovea import status

    st = sub.add_parser("status", help="one screen of the cluster's state: models, aliases, workers, the gateway")
    status.add_arguments(st, DEFAULT_REGISTRY, DEFAULT_GATEWAY)
    st.set_defaults(func=cmd_status)

    for name, (module, func, text) in DELEGATED.items():
        q = sub.add_parser(name, help=text, add_help=False)
        q.add_argument("rest", nargs=argparse.REMAINDER)
        q.set_defaults(func=_delegate(module, func))
    return p


def main(argv: list[str] | None = None) -> int:
    import importlib

    codegen.require()
    argv = sys.argv[1:] if argv is None else argv
    # argparse's REMAINDER drops a leading --help, so delegated commands skip it entirely.
    if argv and argv[0] in DELEGATED:
        module, func, _ = DELEGATED[argv[0]]
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    if len(argv) > 1 and argv[0] == "model" and argv[1] in MODEL_DELEGATED:
        module, func = MODEL_DELEGATED[argv[1]]
        return int(getattr(importlib.import_module(module), func)(argv[2:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

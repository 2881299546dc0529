"""The bindings of the gateway's native front (gateway/native/front.cc), which serves the one public port.

ModelInfer with an API key this gateway has already verified and that has no rate limits is answered
in C++: the request's bytes go to a worker as they came. Every other call (unknown, limited, revoked or
expired keys, other methods, anything that fails) is passed, bytes and metadata unchanged, to this
gateway's Python server over a unix socket in a private directory, which answers it as usual. Python
keeps the front's tables current from the registry's watch streams.

Every call goes through the cffi module built from native/api.h (fovea/native.py loads it), which checks it
against the header; tables, counters and call records cross as the structs declared there.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import time
from typing import Any

from fovea.errors import Draining, InvalidArgument
from fovea.native import binding_path, load_binding
from fovea.v1 import model_pb2, registry_pb2
from gateway.config import RECONNECT_S, reconnect_ms
from gateway.forward import Forwards

logger = logging.getLogger(__name__)

# The binding: the cffi extension module CMakeLists.txt builds from native/api.h (fovea/native.py).
PART = pathlib.Path(__file__).parent
MODULE = "_fovea_gateway"
LOG_BATCH = 1024  # records taken per fg_drain_log call; a drain takes as many batches as there are
EJECTED_BATCH = 64


def binding_file() -> pathlib.Path:
    """Where the binding is, or would be (FOVEA_NATIVE_BUILD picks the build folder)."""
    return binding_path(PART, MODULE)


def available() -> bool:
    return binding_file().exists()


def binding() -> tuple[Any, Any]:
    """(ffi, lib) of the binding; RuntimeError when it is not built, ImportError when it cannot be loaded."""
    return load_binding(PART, MODULE)


@dataclasses.dataclass(frozen=True)
class AliasTarget:
    model: str
    version: int
    weight: float


@dataclasses.dataclass(frozen=True)
class ImageModel:
    model: str
    version: int
    input: str
    output: str
    width: int


@dataclasses.dataclass(frozen=True)
class WorkerRoute:
    model: str
    version: int
    fast_address: str
    main_address: str
    queue_depth: int


@dataclasses.dataclass(frozen=True)
class RouteTable:
    """The front's routing table (struct fg_routes in native/api.h)."""

    aliases: list[AliasTarget] = dataclasses.field(default_factory=list)
    images: list[ImageModel] = dataclasses.field(default_factory=list)
    workers: list[WorkerRoute] = dataclasses.field(default_factory=list)

    def workers_of(self, model: str) -> list[WorkerRoute]:
        return [w for w in self.workers if w.model == model]

    def has_alias(self, model: str) -> bool:
        return any(a.model == model for a in self.aliases)

    def fast_addresses(self) -> set[str]:
        return {w.fast_address for w in self.workers}


@functools.cache
def shared_binding() -> tuple[Any, Any]:
    """binding(), loaded once for the calls that need no front (fg_check_tensor, fg_model_allowed,
    fg_canary_pick)."""
    return binding()


def model_allowed(patterns: list[str], model: str) -> bool:
    """Whether an API key with these model patterns may use the model: the front's rule (keys.h model_allowed,
    fnmatch(3); none: every model), the gateway's only copy."""
    ffi, lib = shared_binding()
    encoded = [ffi.new("char[]", p.encode()) for p in patterns]
    return bool(lib.fg_model_allowed(ffi.new("char *[]", encoded), len(encoded), model.encode()))


def canary_pick(alias: model_pb2.Alias) -> int:
    """The version of the alias that serves one call, by its targets' weights: the front's pick (fovea/canary.h),
    the gateway's only copy, for aliases its table does not hold."""
    targets = list(alias.targets)
    if not targets:
        raise ValueError(f"alias {alias.name} has no targets")
    ffi, lib = shared_binding()
    index = lib.fg_canary_pick(ffi.new("int32_t[]", [t.weight for t in targets]), len(targets))
    if index < 0:
        raise ValueError(f"alias {alias.name} has weights out of 0..100 or too many targets")
    return int(targets[index].version)


@dataclasses.dataclass(frozen=True)
class InferCheck:
    """A ModelInferRequest the front checked (struct fg_check): the gateway's only copy of the rules."""

    refusal: str  # the INVALID_ARGUMENT message of the first rule it breaks; "" when it breaks none
    over_limit: str  # the message for images past the per-call limit, given after the key's model access; ""
    images: int  # what the call is charged for
    model: str
    version: int  # 0: none asked for
    tensors: bool  # every input a raw numeric tensor (a worker's fast port takes it)


def tensor_elements(tensor: bytes) -> int:
    """A serialized InferInputTensor's element count, after the front's checks of its datatype and shape
    (fg_check_tensor); InvalidArgument with the rule it breaks."""
    ffi, lib = shared_binding()
    out = ffi.new("struct fg_check*")
    if lib.fg_check_tensor(tensor, len(tensor), out) != 0:
        raise InvalidArgument("the tensor is too large to check")
    if not out.valid:
        raise InvalidArgument(ffi.string(out.message).decode())
    return int(out.elements)


class CStrings:
    """Keeps the C strings of one call's structs alive until the call returns (the front copies what it keeps)."""

    def __init__(self, ffi: Any) -> None:
        self.ffi = ffi
        self.owned: list[Any] = []

    def __call__(self, text: str | bytes) -> Any:
        s = self.ffi.new("char[]", text.encode() if isinstance(text, str) else text)
        self.owned.append(s)
        return s

    def array(self, texts: list[str]) -> Any:
        a = self.ffi.new("char*[]", [self(t) for t in texts])
        self.owned.append(a)
        return a


class NativeGateway:
    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        python_address: str,
        worker_token: str,
        default_deadline_ms: int,
        max_deadline_ms: int,
        max_samples: int,
        eject_after: int,
        max_pending: int,
        tls: tuple[bytes, bytes, bytes] = (b"", b"", b""),
        threads: int = 1,
        unread_window_bytes: int = 64 * 1024,
        max_calls_per_key: int = 0,
        worker_tls: tuple[bytes, bytes, bytes] = (b"", b"", b""),
        reconnect_s: tuple[float, float] = RECONNECT_S,
    ) -> None:
        """tls: (certificate chain, private key, client CA) in PEM; empty serves plaintext, an empty CA
        asks for no client certificate. worker_tls: (the workers' CA, this gateway's certificate chain and
        private key) in PEM for TLS to the workers; an empty CA dials them in plaintext. reconnect_s: the first and the
        longest wait before dialling a worker again."""
        self.ffi, self.lib = binding()
        self.handle: Any = None
        ffi = self.ffi
        if not 0 <= unread_window_bytes < 2**31 or threads > self.lib.FG_MAX_THREADS:
            raise ValueError(f"the front takes up to {self.lib.FG_MAX_THREADS} threads and a window under 2 GiB")
        waits_ms = reconnect_ms(reconnect_s)
        if not 0 < waits_ms[0] <= waits_ms[1] <= self.lib.FG_MAX_RECONNECT_MS:
            raise ValueError(f"reconnect waits must be 1 ms <= first <= longest <= {self.lib.FG_MAX_RECONNECT_MS} ms")
        text = CStrings(ffi)
        cert, key, client_ca = tls
        worker_ca, worker_cert, worker_key = worker_tls
        config = ffi.new(
            "struct fg_config*",
            {
                "address": text(address),
                "python_address": text(python_address),
                "worker_token": text(worker_token),
                "tls_cert_pem": text(cert),
                "tls_key_pem": text(key),
                "tls_client_ca_pem": text(client_ca),
                "max_message_bytes": max_message_bytes,
                "eject_after_failures": eject_after,
                "fast_threads": threads,
                "default_deadline_ms": default_deadline_ms,
                "max_deadline_ms": max_deadline_ms,
                "max_images_per_call": max_samples,
                "max_pending_calls": max_pending,
                "unread_window_bytes": unread_window_bytes,
                "max_calls_per_key": max_calls_per_key,
                "worker_ca_pem": text(worker_ca),
                "worker_cert_pem": text(worker_cert),
                "worker_key_pem": text(worker_key),
                "reconnect_min_ms": waits_ms[0],
                "reconnect_max_ms": waits_ms[1],
            },
        )
        port = ffi.new("int*")
        handle = self.lib.fg_start(config, port)
        if handle == ffi.NULL:
            raise OSError(f"the gateway cannot listen on {address} (in use, or not an address of this host)")
        self.handle = handle
        self.port = int(port[0])
        self.routes = RouteTable()  # the last table sent (read by tests)
        # Filled by drain_log and take_ejected, which only the drain task calls (gateway/server.py drain_native).
        self._log = ffi.new("struct fg_log_record[]", LOG_BATCH)
        self._dropped = ffi.new("int64_t*")
        self._ejected = ffi.new("struct fg_address[]", EJECTED_BATCH)
        self.forwards = Forwards(ffi, self.lib, handle)  # calls the Python server routes through the front

    def set_classify_limits(self, default_top_k: int, per_forward: int, image_bytes: int, image_pixels: int) -> None:
        """Classify's limits (gateway/config.py): a call past one goes to the Python server, which says which, or
        (more images than one worker batch) splits it."""
        self.lib.fg_set_classify_limits(self.handle, default_top_k, per_forward, image_bytes, image_pixels)

    def check_classify(self, sizes: list[int], top_k: int) -> tuple[int, str]:
        """(the call's top_k, the first limit its images break as the refusal's message, "" when none): the front's
        rule and limits (classify.h limits_refusal), for the Classify calls the Python server takes."""
        refusal = self.ffi.new("char[]", 512)
        k = self.lib.fg_check_classify(self.handle, len(sizes), self.ffi.new("int64_t[]", sizes), top_k, refusal, 512)
        return int(k), self.ffi.string(refusal).decode()

    def check_pixels(self, index: int, width: int, height: int) -> str:
        """The refusal's message for image index of width x height pixels past the front's limit, else ""."""
        refusal = self.ffi.new("char[]", 512)
        self.lib.fg_check_pixels(self.handle, index, width, height, refusal, 512)
        return self.ffi.string(refusal).decode()

    def set_max_top_k(self, k: int) -> None:
        """The most classes a call's classification parameter may ask for: the front's checks refuse larger asks."""
        self.lib.fg_set_max_top_k(self.handle, k)

    def check_infer(self, request: bytes) -> InferCheck:
        """The gateway's rules for a serialized ModelInferRequest, and the images it is charged for, as the front
        applies them to the calls it answers (fg_check_infer)."""
        if not self.handle:
            raise Draining("gateway is stopping; retry on another replica")
        ffi = self.ffi
        out = ffi.new("struct fg_check*")
        if self.lib.fg_check_infer(self.handle, request, len(request), out) != 0:
            raise InvalidArgument("the request is not a valid ModelInferRequest message")  # past 2 GiB
        return InferCheck(
            ffi.string(out.message).decode(),
            ffi.string(out.over_limit).decode(),
            int(out.images),
            ffi.string(out.model).decode(),
            int(out.version),
            bool(out.tensors),
        )

    def set_trace_sampled(self, on: bool) -> None:
        """Send calls whose traceparent is sampled to the Python server, which traces them (issue 21)."""
        self.lib.fg_set_trace_sampled(self.handle, int(on))

    def _key(self, digest: bytes, record: registry_pb2.ApiKey, ttl_s: float, text: CStrings) -> Any:
        if len(digest) != self.lib.FG_DIGEST_BYTES:
            raise ValueError(f"a key's digest is {self.lib.FG_DIGEST_BYTES} bytes, not {len(digest)}")
        expires = time.time_ns() + int(ttl_s * 1e9)
        if record.HasField("expires_at"):
            expires = min(expires, record.expires_at.ToNanoseconds())
        patterns = list(record.model_patterns)
        return self.ffi.new(
            "struct fg_key*",
            {
                "digest": digest,
                "key_id": text(record.key_id),
                "role": int(record.role),
                "model_patterns": text.array(patterns) if patterns else self.ffi.NULL,
                "n_model_patterns": len(patterns),
                "expires_ns": expires,
            },
        )

    def put_key(self, digest: bytes, record: registry_pb2.ApiKey, ttl_s: float) -> None:
        """Let the front answer this key's calls itself (only keys without rate limits: see ratelimit.py),
        for ttl_s at most, like the Python cache: then its next call is verified at the registry again.
        digest: the SHA-256 of the key's secret, which never reaches the front."""
        if not self.handle:
            return
        text = CStrings(self.ffi)
        if self.lib.fg_put_key(self.handle, self._key(digest, record, ttl_s, text)) != 0:
            logger.warning("the native front refused key %s (a string or pattern list past its bounds)", record.key_id)

    def put_limited_key(self, digest: bytes, record: registry_pb2.ApiKey, ttl_s: float) -> None:
        """A verified key with rate limits: the front reads its calls' bodies (an unknown key's call is held
        unread until the Python server has verified it) and passes them to the Python server, which charges them."""
        if not self.handle:
            return
        text = CStrings(self.ffi)
        if self.lib.fg_put_limited_key(self.handle, self._key(digest, record, ttl_s, text)) != 0:
            logger.warning("the native front refused key %s (its id past its bound)", record.key_id)

    def drop_keys(self, key_ids: list[str]) -> None:
        for key_id in key_ids:
            if self.handle:
                self.lib.fg_drop_key(self.handle, key_id.encode())

    def clear_keys(self) -> None:
        if self.handle:
            self.lib.fg_clear_keys(self.handle)

    def set_routes(self, table: RouteTable) -> None:
        self.routes = table
        if not self.handle:
            return
        ffi, text = self.ffi, CStrings(self.ffi)
        aliases = ffi.new(
            "struct fg_alias_target[]",
            [{"model": text(a.model), "version": a.version, "weight": a.weight} for a in table.aliases],
        )
        images = ffi.new(
            "struct fg_image_model[]",
            [
                {
                    "model": text(m.model),
                    "version": m.version,
                    "input": text(m.input),
                    "output": text(m.output),
                    "width": m.width,
                }
                for m in table.images
            ],
        )
        workers = ffi.new(
            "struct fg_worker_route[]",
            [
                {
                    "model": text(w.model),
                    "version": w.version,
                    "fast_address": text(w.fast_address),
                    "main_address": text(w.main_address),
                    "queue_depth": w.queue_depth,
                }
                for w in table.workers
            ],
        )
        routes = ffi.new(
            "struct fg_routes*",
            {
                "aliases": aliases,
                "n_aliases": len(table.aliases),
                "images": images,
                "n_images": len(table.images),
                "workers": workers,
                "n_workers": len(table.workers),
            },
        )
        skipped = self.lib.fg_set_routes(self.handle, routes)
        if skipped:
            logger.warning("the native front left %s routing entries out (strings past their bounds)", skipped)

    def counts(self) -> dict[str, Any]:
        c = self.ffi.new("struct fg_counters*")  # its own: metrics scrapes read it from another thread
        if self.handle:
            self.lib.fg_counts(self.handle, c)
        return {
            "codes": list(c.codes),
            "native": c.native_calls,
            "python": c.python_calls,
            "retries": c.retries,
            "in_progress": c.pending_calls,
            "call_objects": c.call_objects,
        }

    def drain_log(self) -> tuple[list[tuple[float, int, float, str, str, str, str, str]], int]:
        """Native calls finished since the last drain: (epoch s, code, seconds, request id, model, version,
        worker fast address, method) each, and how many were dropped because nobody drained them in time."""
        rows: list[tuple[float, int, float, str, str, str, str, str]] = []
        dropped = 0
        while self.handle:
            n = self.lib.fg_drain_log(self.handle, self._log, LOG_BATCH, self._dropped)
            dropped += self._dropped[0]
            rows += [self._row(self._log[i]) for i in range(n)]
            if n < LOG_BATCH:
                break
        return rows, dropped

    def _row(self, r: Any) -> tuple[float, int, float, str, str, str, str, str]:
        def text(field: Any) -> str:
            return self.ffi.string(field).decode(errors="replace")

        return (
            r.epoch_s,
            r.code,
            r.seconds,
            text(r.request_id),
            text(r.model),
            str(r.version) if r.version else "",  # a call refused before its version was resolved, as Python logs it
            text(r.worker),
            text(r.method),
        )

    def take_ejected(self) -> list[str]:
        """Fast addresses of the workers the front ejected since the last call (Python probes them)."""
        out: list[str] = []
        while self.handle:
            n = self.lib.fg_take_ejected(self.handle, self._ejected, EJECTED_BATCH)
            out += [self.ffi.string(self._ejected[i].text).decode(errors="replace") for i in range(n)]
            if n < EJECTED_BATCH:
                break
        return out

    def readmit(self, fast_address: str) -> None:
        """The worker passed its probe: the front routes to it again."""
        if self.handle:
            self.lib.fg_readmit(self.handle, fast_address.encode())

    def pick_version(self, model: str) -> int:
        """The version the front sends a call for model without one to (its production alias's canary pick, by
        weight); 0 when its table has no production alias for model."""
        return int(self.lib.fg_pick_version(self.handle, model.encode())) if self.handle else 0

    def choose(self, model: str, version: int) -> str:
        """The fast address of the worker the front would send a call for model/version to now (the power of two
        choices by load); "" when no worker serves it."""
        out = self.ffi.new("struct fg_address*")
        if not self.handle or not self.lib.fg_choose(self.handle, model.encode(), version, out):
            return ""
        return self.ffi.string(out.text).decode(errors="replace")

    def set_accepting(self, accepting: bool) -> None:
        if self.handle:
            self.lib.fg_set_accepting(self.handle, int(accepting))

    def shutdown(self, grace_s: float) -> None:
        if self.handle:
            self.lib.fg_shutdown(self.handle, grace_s)

    def close(self) -> None:
        if self.handle:
            self.forwards.close()
            handle, self.handle = self.handle, None
            self.lib.fg_free(handle)


def route_table(
    aliases: dict[tuple[str, str], model_pb2.Alias], versions: dict[tuple[str, int], Any], endpoints: dict[str, Any]
) -> RouteTable:
    """The front's routing table: production alias targets, which workers (fast and main port) serve what, and the
    tensors of the versions that take images (for Classify: input, output, the output's width)."""
    archived = {key for key, mv in versions.items() if mv.state == model_pb2.VERSION_STATE_ARCHIVED}
    table = RouteTable()
    for (model, version), mv in versions.items():
        if (model, version) in archived or not mv.HasField("preprocessing") or not mv.inputs or not mv.outputs:
            continue
        names = (mv.inputs[0].name, mv.outputs[0].name)
        if all(names):
            width = mv.outputs[0].shape[-1] if mv.outputs[0].shape else 0
            table.images.append(ImageModel(model, version, names[0], names[1], max(0, width)))
    for (model, name), alias in aliases.items():
        if name == "production":
            table.aliases.extend(
                AliasTarget(model, t.version, t.weight) for t in alias.targets if (model, t.version) not in archived
            )
    for ep in endpoints.values():  # ejected ones too: the front sets them aside itself, and tries them when no
        st = ep.status  # other worker has the version
        if st.state != registry_pb2.WORKER_STATE_READY:
            continue
        table.workers.extend(
            WorkerRoute(m.name, m.version, ep.address, st.address, st.queue_depth)
            for m in st.models
            if m.ready and (m.name, m.version) not in archived
        )
    return table

"""The bindings of the gateway's native front (gateway/native/front.cc), which serves the one public port.

ModelInfer with an API key this gateway has already verified and that has no rate limits is answered
in C++: the request's bytes go to a worker as they came. Every other call (unknown, limited, revoked or
expired keys, other methods, anything that fails) is passed, bytes and metadata unchanged, to this
gateway's Python server over a unix socket in a private directory, which answers it as usual. Python
keeps the front's tables current from the registry's watch streams.
"""

from __future__ import annotations

import ctypes as C
import logging
import os
import pathlib
import time
from typing import Any

from fovea.v1 import model_pb2, registry_pb2

logger = logging.getLogger(__name__)

# FOVEA_NATIVE_BUILD picks another build folder: build-asan is the sanitizer build (scripts/sanitize.sh).
BUILD = os.environ.get("FOVEA_NATIVE_BUILD", "") or "build"
LIBRARY = pathlib.Path(__file__).parent / "native" / BUILD / "libfovea_gateway_front.so"


def available() -> bool:
    return LIBRARY.exists()


def load() -> C.CDLL:
    if not LIBRARY.exists():
        raise RuntimeError(f"{LIBRARY} is missing: run gateway/native/build.sh (scripts/setup.sh does)")
    lib = C.CDLL(str(LIBRARY))
    p, i, i64, s = C.c_void_p, C.c_int, C.c_int64, C.c_char_p
    lib.fg_start.restype = p
    lib.fg_start.argtypes = [s, i, s, s, i64, i64, i64, i, i64, i, s, s, s, C.POINTER(i)]
    lib.fg_drain_log.restype = i64
    lib.fg_drain_log.argtypes = [p, p, i64, C.POINTER(i64)]
    lib.fg_put_key.argtypes = [p, s, s, i, s, i64]
    lib.fg_drop_key.argtypes = [p, s]
    lib.fg_clear_keys.argtypes = [p]
    lib.fg_set_routes.argtypes = [p, s]
    lib.fg_counts.argtypes = [p, p]
    lib.fg_set_accepting.argtypes = [p, i]
    lib.fg_take_ejected.restype = i64
    lib.fg_take_ejected.argtypes = [p, p, i64]
    lib.fg_readmit.argtypes = [p, s]
    lib.fg_shutdown.argtypes = [p, C.c_double]
    lib.fg_free.argtypes = [p]
    return lib


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
    ) -> None:
        """tls: (certificate chain, private key, client CA) in PEM; empty serves plaintext, an empty CA
        asks for no client certificate."""
        self.lib = load()
        self.lib.fg_set_unread_window.argtypes = [C.c_int64]
        self.lib.fg_set_unread_window(unread_window_bytes)
        port = C.c_int(0)
        cert, key, client_ca = tls
        self.handle = self.lib.fg_start(
            address.encode(),
            max_message_bytes,
            python_address.encode(),
            worker_token.encode(),
            default_deadline_ms,
            max_deadline_ms,
            max_samples,
            eject_after,
            max_pending,
            threads,
            cert,
            key,
            client_ca,
            C.byref(port),
        )
        self._log_buf = C.create_string_buffer(1 << 20)
        if not self.handle:
            raise OSError(f"the gateway cannot listen on {address} (in use, or not an address of this host)")
        self.port = port.value
        self.routes = ""
        # Functions added for issue 18 declare their arguments here, apart from the loader.
        self.lib.fg_put_limited_key.argtypes = [C.c_void_p, C.c_char_p, C.c_char_p, C.c_int64]
        self.lib.fg_set_max_top_k.argtypes = [C.c_void_p, C.c_int64]
        self.lib.fg_set_trace_sampled.argtypes = [C.c_void_p, C.c_int]
        self.lib.fg_set_classify_limits.argtypes = [C.c_void_p, C.c_int64, C.c_int64, C.c_int64, C.c_int64]

    def set_classify_limits(self, default_top_k: int, per_forward: int, image_bytes: int, image_pixels: int) -> None:
        """Classify's limits (gateway/config.py): a call past one goes to the Python server, which says which, or
        (more images than one worker batch) splits it."""
        self.lib.fg_set_classify_limits(self.handle, default_top_k, per_forward, image_bytes, image_pixels)

    def set_max_top_k(self, k: int) -> None:
        """The most classes a call's classification parameter may ask for; larger asks go to the Python server,
        which refuses them (gateway/validate.py)."""
        self.lib.fg_set_max_top_k(self.handle, k)

    def set_trace_sampled(self, on: bool) -> None:
        """Send calls whose traceparent is sampled to the Python server, which traces them (issue 21)."""
        self.lib.fg_set_trace_sampled(self.handle, int(on))

    def put_key(self, digest: bytes, record: registry_pb2.ApiKey, ttl_s: float) -> None:
        """Let the front answer this key's calls itself (only keys without rate limits: see ratelimit.py),
        for ttl_s at most, like the Python cache: then its next call is verified at the registry again.
        digest: the SHA-256 of the key's secret, which never reaches the front."""
        if not self.handle:
            return
        expires = time.time_ns() + int(ttl_s * 1e9)
        if record.HasField("expires_at"):
            expires = min(expires, record.expires_at.ToNanoseconds())
        self.lib.fg_put_key(
            self.handle,
            digest,
            record.key_id.encode(),
            int(record.role),
            "\n".join(record.model_patterns).encode(),
            expires,
        )

    def put_limited_key(self, digest: bytes, record: registry_pb2.ApiKey, ttl_s: float) -> None:
        """A verified key with rate limits: the front reads its calls' bodies (an unknown key's call is held
        unread until the Python server has verified it) and passes them to the Python server, which charges them."""
        if not self.handle:
            return
        expires = time.time_ns() + int(ttl_s * 1e9)
        if record.HasField("expires_at"):
            expires = min(expires, record.expires_at.ToNanoseconds())
        self.lib.fg_put_limited_key(self.handle, digest, record.key_id.encode(), expires)

    def drop_keys(self, key_ids: list[str]) -> None:
        for key_id in key_ids:
            if self.handle:
                self.lib.fg_drop_key(self.handle, key_id.encode())

    def clear_keys(self) -> None:
        if self.handle:
            self.lib.fg_clear_keys(self.handle)

    def set_routes(self, text: str) -> None:
        self.routes = text  # the last table sent (read by tests)
        if self.handle:
            self.lib.fg_set_routes(self.handle, text.encode())

    def counts(self) -> dict[str, Any]:
        out = (C.c_int64 * 22)()
        if self.handle:
            self.lib.fg_counts(self.handle, out)
        return {
            "codes": list(out[:17]),
            "native": out[17],
            "python": out[18],
            "retries": out[19],
            "in_progress": out[20],
            "call_objects": out[21],
        }

    def drain_log(self) -> tuple[list[tuple[float, int, float, str, str, str, str, str]], int]:
        """Native calls finished since the last drain: (epoch s, code, seconds, request id, model, version,
        worker fast address, method) each, and how many were dropped because nobody drained them in time."""
        if not self.handle:
            return [], 0
        dropped = C.c_int64(0)
        n = self.lib.fg_drain_log(self.handle, self._log_buf, len(self._log_buf), C.byref(dropped))
        if n < 0:
            self._log_buf = C.create_string_buffer(2 * -n)
            n = self.lib.fg_drain_log(self.handle, self._log_buf, len(self._log_buf), C.byref(dropped))
        rows = []
        for line in self._log_buf.raw[: max(0, n)].decode(errors="replace").splitlines():
            ts, code, seconds, rid, model, version, worker, method = line.split("\t")
            rows.append((float(ts), int(code), float(seconds), rid, model, version, worker, method))
        return rows, dropped.value

    def take_ejected(self) -> list[str]:
        """Fast addresses of the workers the front ejected since the last call (Python probes them)."""
        if not self.handle:
            return []
        buf = C.create_string_buffer(1 << 16)
        n = self.lib.fg_take_ejected(self.handle, buf, len(buf))
        return buf.raw[:n].decode().split() if n > 0 else []

    def readmit(self, fast_address: str) -> None:
        """The worker passed its probe: the front routes to it again."""
        if self.handle:
            self.lib.fg_readmit(self.handle, fast_address.encode())

    def set_accepting(self, accepting: bool) -> None:
        if self.handle:
            self.lib.fg_set_accepting(self.handle, int(accepting))

    def shutdown(self, grace_s: float) -> None:
        if self.handle:
            self.lib.fg_shutdown(self.handle, grace_s)

    def close(self) -> None:
        if self.handle:
            handle, self.handle = self.handle, None
            self.lib.fg_free(handle)


def routes_text(
    aliases: dict[tuple[str, str], model_pb2.Alias], versions: dict[tuple[str, int], Any], endpoints: dict[str, Any]
) -> str:
    """The front's routing table: production alias targets, which workers (fast and main port) serve what, and the
    tensors of the versions that take images (for Classify: input, output, the output's width)."""
    archived = {key for key, mv in versions.items() if mv.state == model_pb2.VERSION_STATE_ARCHIVED}
    lines = []
    for (model, version), mv in versions.items():
        if (model, version) in archived or not mv.HasField("preprocessing") or not mv.inputs or not mv.outputs:
            continue
        names = (mv.inputs[0].name, mv.outputs[0].name)
        if all(name and name.isprintable() and not any(c.isspace() for c in name) for name in names):
            width = mv.outputs[0].shape[-1] if mv.outputs[0].shape else 0
            lines.append(f"I {model} {version} {names[0]} {names[1]} {max(0, width)}")
    for (model, name), alias in aliases.items():
        if name == "production":
            lines += [f"A {model} {t.version} {t.weight}" for t in alias.targets if (model, t.version) not in archived]
    for ep in endpoints.values():
        st = ep.status
        if not st.fast_address or ep.ejected or st.state != registry_pb2.WORKER_STATE_READY:
            continue
        lines += [
            f"W {m.name} {m.version} {st.fast_address} {st.address} {st.queue_depth}"
            for m in st.models
            if m.ready and (m.name, m.version) not in archived
        ]
    return "\n".join(lines) + "\n"

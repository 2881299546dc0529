"""API key checks at the gateway: verified once at the registry, then cached in memory.

The cache is keyed by a SHA-256 of the secret (the secret itself is never kept
or logged); the registry compares secrets against salted digests in constant
time, and a dict lookup on a SHA-256 leaks nothing usable about the secret. The
registry's key watch drops revoked keys within a second on every replica;
expiry is checked on every call. An answer of the registry that a key event
overtook (a revocation arriving while the key was being verified) is asked
again and never cached, so a revoked key cannot sit in the cache as valid.
Refused secrets are remembered briefly, so a client retrying a bad key does
not turn into a stream of registry calls.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from fovea.errors import FoveaError, PermissionDenied, Unauthenticated
from fovea.rpc import bearer_token
from fovea.v1 import registry_pb2
from gateway.fast_port import model_allowed

MAX_SECRET_LEN = 200
MAX_REFUSED_ENTRIES = 10_000
MAX_CHANGED_ENTRIES = 10_000


class KeyVerifier(Protocol):
    """What the cache asks: the registry's record of a secret (fovea.registry_link.RegistryLink)."""

    async def verify_key(self, secret: str) -> registry_pb2.ApiKey: ...


class KeyCache:
    def __init__(
        self, link: KeyVerifier, ttl_s: float, refused_ttl_s: float = 1.0, min_role: int = registry_pb2.ROLE_INFER
    ) -> None:
        self.link = link
        self.ttl_s = ttl_s
        self.refused_ttl_s = refused_ttl_s
        self.min_role = min_role
        self.entries: dict[bytes, tuple[registry_pb2.ApiKey, float]] = {}
        self.refused: dict[bytes, tuple[str, float]] = {}
        # Key watch events, counted: a verification cached only if no event for its key came while it ran.
        self.epoch = 0
        self.changed: dict[str, int] = {}  # key id -> epoch of its last event
        self.cleared_at = 0  # epoch of the last snapshot, or of forgetting `changed`
        # Told of each key verified at the registry (by the SHA-256 of its secret) and of each watch event:
        # the native front's cache.
        self.on_verified: Callable[[bytes, registry_pb2.ApiKey], None] | None = None
        self.on_change: Callable[[registry_pb2.WatchApiKeysResponse], None] | None = None

    async def check(self, secret: str) -> registry_pb2.ApiKey:
        digest = hashlib.sha256(secret.encode()).digest()
        now = time.monotonic()
        hit = self.entries.get(digest)
        fresh = False
        if hit is not None and hit[1] > now:
            record = hit[0]
        else:
            if not secret.startswith("fv_") or len(secret) > MAX_SECRET_LEN:
                raise Unauthenticated("malformed API key: expected 'authorization: Bearer fv_...'")
            no = self.refused.get(digest)
            if no is not None and no[1] > now:
                raise Unauthenticated(no[0])
            record, fresh = await self.verify(secret, digest)
            if fresh:
                self.entries[digest] = (record, now + self.ttl_s)
        if record.revoked:
            raise Unauthenticated("API key revoked")
        if record.HasField("expires_at") and record.expires_at.ToNanoseconds() <= time.time_ns():
            raise Unauthenticated("API key expired")
        if record.role < self.min_role:
            raise PermissionDenied(
                f"API key {record.key_id} has role {registry_pb2.Role.Name(record.role)}; "
                f"this gateway takes {registry_pb2.Role.Name(self.min_role)} keys or higher"
            )
        if fresh and self.on_verified is not None:
            self.on_verified(digest, record)
        return record

    async def verify(self, secret: str, digest: bytes) -> tuple[registry_pb2.ApiKey, bool]:
        """The registry's record of the key, and whether it may be cached: not when a watch event for the key
        (a revocation, say) came while the registry was asked, since the answer may predate it. Then the
        registry is asked once more, and that answer serves this call only."""
        for _ in range(2):
            start = self.epoch
            record = await self.ask(secret, digest)
            if self.cleared_at <= start and self.changed.get(record.key_id, -1) <= start:
                return record, True
        return record, False

    async def ask(self, secret: str, digest: bytes) -> registry_pb2.ApiKey:
        try:
            return await self.link.verify_key(secret)  # raises UNAUTHENTICATED as the registry says
        except FoveaError as exc:
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                if len(self.refused) >= MAX_REFUSED_ENTRIES:
                    self.refused.clear()
                self.refused[digest] = (str(exc), time.monotonic() + self.refused_ttl_s)
            raise

    def on_event(self, event: registry_pb2.WatchApiKeysResponse) -> None:
        self.epoch += 1
        if event.snapshot or len(self.changed) >= MAX_CHANGED_ENTRIES:
            self.changed.clear()
            self.cleared_at = self.epoch
        for key_id in event.key_ids:
            self.changed[key_id] = self.epoch
        if self.on_change is not None:
            self.on_change(event)
        if event.snapshot:
            self.entries.clear()
            return
        gone = set(event.key_ids)
        self.refused.clear()
        for digest, (record, _) in list(self.entries.items()):
            if record.key_id in gone:
                del self.entries[digest]

    def authenticator(self) -> Any:
        async def authenticate(method: str, metadata: dict[str, Any]) -> Any:
            return await self.check(bearer_token(metadata))

        return authenticate


def check_model_access(api_key: registry_pb2.ApiKey, model: str) -> None:
    """Raise PermissionDenied unless the key may call inference on this model."""
    if api_key.role < registry_pb2.ROLE_INFER:
        raise PermissionDenied(f"API key {api_key.key_id} has no inference role")
    if not model_allowed(list(api_key.model_patterns), model):
        raise PermissionDenied(f"API key {api_key.key_id} may not use model {model!r}")

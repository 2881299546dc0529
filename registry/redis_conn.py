"""Redis connections from a URL: redis://, rediss:// (TLS) or redis+sentinel://.

Every client retries a failed command with exponential backoff (about 2 s in all),
reconnecting as it goes, so a Redis restart costs the callers a short wait instead
of an error; after that the call fails and the RPC answers UNAVAILABLE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """What a redis+sentinel://[:password@]host:port[,host:port]/service[/db] URL names."""

    hosts: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse a Sentinel URL; raises ValueError with what to fix.

    The password (if any) is the master's; add ?sentinel_password=... when the
    Sentinels themselves need another one.
    """
    parsed = urlparse(url)
    if parsed.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
    userinfo, _, hostlist = parsed.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else None
    hosts = []
    for part in hostlist.split(","):
        host, sep, port = part.strip().rpartition(":") if ":" in part else (part.strip(), "", "")
        if not host:
            raise ValueError(f"sentinel URL has an empty host in {hostlist!r}")
        try:
            hosts.append((host, int(port) if sep else DEFAULT_SENTINEL_PORT))
        except ValueError:
            raise ValueError(f"sentinel URL has a bad port in {part!r}") from None
    path = [p for p in parsed.path.split("/") if p]
    if not path:
        raise ValueError("sentinel URL needs a service name: redis+sentinel://host:26379/mymaster[/db]")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("sentinel URL path must be /service_name or /service_name/db")
    query = parse_qs(parsed.query)
    return SentinelTarget(
        hosts=tuple(hosts),
        service=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        username=username,
        password=password,
        sentinel_password=query.get("sentinel_password", [None])[0],
    )


def _common() -> dict[str, Any]:
    return dict(
        retry=Retry(ExponentialBackoff(cap=0.4, base=0.02), retries=8),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
        socket_connect_timeout=1.0,
        socket_timeout=5.0,
        health_check_interval=5,
    )


def connect(url: str) -> aioredis.Redis:
    """A client for the URL, retrying with backoff while Redis restarts."""
    scheme = urlparse(url).scheme
    if scheme == SENTINEL_SCHEME:
        from redis.asyncio.sentinel import Sentinel

        t = parse_sentinel_url(url)
        sentinel = Sentinel(list(t.hosts), sentinel_kwargs={"password": t.sentinel_password, **_common()}, **_common())
        return sentinel.master_for(t.service, db=t.db, username=t.username, password=t.password)
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"unsupported Redis URL scheme {scheme!r}: use redis://, rediss:// or redis+sentinel://")
    return aioredis.from_url(url, **_common())

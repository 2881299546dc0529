"""Redis connections from a URL: redis://, rediss:// (TLS) or redis+sentinel://."""

from __future__ import annotations

from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def connect(url: str) -> aioredis.Redis:
    """A client that retries with backoff while Redis restarts (about 2 s in all per call)."""
    retry = Retry(ExponentialBackoff(cap=0.4, base=0.02), retries=8)
    common = dict(
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
        socket_connect_timeout=1.0,
        socket_timeout=5.0,
        health_check_interval=5,
    )
    if url.startswith("redis+sentinel://"):
        # redis+sentinel://host:port[,host:port]/service_name[/db]
        from redis.asyncio.sentinel import Sentinel

        parsed = urlparse(url)
        hosts = []
        for part in parsed.netloc.split("@")[-1].split(","):
            host, _, port = part.partition(":")
            hosts.append((host, int(port or 26379)))
        path = [p for p in parsed.path.split("/") if p]
        if not path:
            raise ValueError("sentinel URL needs a service name: redis+sentinel://host:port/mymaster")
        db = int(path[1]) if len(path) > 1 else 0
        sentinel = Sentinel(hosts, password=parsed.password, **common)  # type: ignore[arg-type]
        return sentinel.master_for(path[0], db=db, password=parsed.password)
    return aioredis.from_url(url, **common)  # type: ignore[arg-type]

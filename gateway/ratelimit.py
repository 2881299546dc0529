"""Per-key rate limits (requests/s and images/s, with a burst), shared by all replicas through Redis.

Each limit is a token bucket. Both buckets of a key are checked and charged in
one Lua script, so that replicas never race and a call refused by one limit
does not spend tokens of the other. The script reads Redis's own clock, so
replicas with skewed clocks still agree.

Keys without limits never touch Redis. If Redis cannot be reached the call is
let through (and a warning logged): a limit is a fairness tool, and an outage
of Redis must not become an outage of inference.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from fovea.errors import RateLimited
from fovea.names import redis_key
from fovea.v1 import registry_pb2

logger = logging.getLogger(__name__)

# KEYS[1], KEYS[2]: request and image buckets (hashes with fields t = tokens, ts = ms).
# ARGV: rps, ips, request burst, image burst, images in this call.
# Returns {1, 0} when admitted, else {0, ms until the call would fit}.
TOKEN_BUCKETS_LUA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + tonumber(now_parts[2]) / 1000
local rates = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local bursts = {tonumber(ARGV[3]), tonumber(ARGV[4])}
local costs = {1, tonumber(ARGV[5])}
local levels = {}
local wait_ms = 0
for i = 1, 2 do
  if rates[i] > 0 then
    local state = redis.call('HMGET', KEYS[i], 't', 'ts')
    local tokens = tonumber(state[1]) or bursts[i]
    local ts = tonumber(state[2]) or now
    tokens = math.min(bursts[i], tokens + math.max(0, now - ts) * rates[i] / 1000)
    levels[i] = tokens
    -- a call larger than the burst needs a full bucket, then leaves it in debt
    local need = math.min(costs[i], bursts[i])
    if tokens < need then
      wait_ms = math.max(wait_ms, (need - tokens) * 1000 / rates[i])
    end
  end
end
if wait_ms > 0 then
  return {0, math.ceil(wait_ms)}
end
for i = 1, 2 do
  if rates[i] > 0 then
    redis.call('HSET', KEYS[i], 't', tostring(levels[i] - costs[i]), 'ts', tostring(now))
    redis.call('PEXPIRE', KEYS[i], math.ceil(bursts[i] * 1000 / rates[i]) + 1000)
  end
end
return {1, 0}
"""


@dataclass(frozen=True)
class Limits:
    rps: float
    ips: float
    request_burst: float
    image_burst: float

    @classmethod
    def of(cls, record: registry_pb2.ApiKey) -> Limits:
        rps, ips = max(0.0, record.rate_limit_rps), max(0.0, record.rate_limit_ips)
        burst = max(0.0, record.rate_burst)
        # a burst below one call would refuse everything; 0 means one second's worth
        return cls(rps, ips, max(1.0, burst or rps), max(1.0, burst or ips))

    @property
    def unlimited(self) -> bool:
        return self.rps <= 0 and self.ips <= 0


class LocalBuckets:
    """The same buckets in this process only: used when no Redis is configured."""

    def __init__(self) -> None:
        self.state: dict[str, tuple[float, float]] = {}

    def take(self, keys: tuple[str, str], limits: Limits, images: int) -> float:
        now = time.monotonic()
        rates = (limits.rps, limits.ips)
        bursts = (limits.request_burst, limits.image_burst)
        costs = (1.0, float(images))
        levels = [0.0, 0.0]
        wait_s = 0.0
        for i in range(2):
            if rates[i] <= 0:
                continue
            tokens, ts = self.state.get(keys[i], (bursts[i], now))
            tokens = min(bursts[i], tokens + max(0.0, now - ts) * rates[i])
            levels[i] = tokens
            need = min(costs[i], bursts[i])
            if tokens < need:
                wait_s = max(wait_s, (need - tokens) / rates[i])
        if wait_s > 0:
            return wait_s
        for i in range(2):
            if rates[i] > 0:
                self.state[keys[i]] = (levels[i] - costs[i], now)
        return 0.0


class RateLimiter:
    def __init__(self, redis_url: str, timeout_s: float = 0.25) -> None:
        self.redis: aioredis.Redis | None = None
        self.script = None
        if redis_url:
            self.redis = aioredis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
            self.script = self.redis.register_script(TOKEN_BUCKETS_LUA)
        self.local = LocalBuckets()
        self.refused = 0
        self._warned_at = 0.0

    async def admit(self, record: registry_pb2.ApiKey, images: int) -> None:
        """Charge one request and `images` images to the key; raise RateLimited when over a limit."""
        limits = Limits.of(record)
        if limits.unlimited:
            return
        keys = (redis_key("ratelimit", record.key_id, "requests"), redis_key("ratelimit", record.key_id, "images"))
        if self.script is None:
            wait_s = self.local.take(keys, limits, images)
        else:
            try:
                ok, wait_ms = await self.script(
                    keys=list(keys), args=[limits.rps, limits.ips, limits.request_burst, limits.image_burst, images]
                )
            except (RedisError, OSError) as exc:
                now = time.monotonic()
                if now - self._warned_at > 10:
                    self._warned_at = now
                    logger.warning("rate limits not enforced: Redis unreachable (%s)", type(exc).__name__)
                return
            wait_s = 0.0 if ok else int(wait_ms) / 1000
        if wait_s > 0:
            self.refused += 1
            what = f"{limits.rps:g} requests/s" if limits.rps else f"{limits.ips:g} images/s"
            if limits.rps and limits.ips:
                what = f"{limits.rps:g} requests/s and {limits.ips:g} images/s"
            raise RateLimited(
                f"API key {record.key_id} is over its rate limit ({what}); retry after {math.ceil(wait_s * 1000)} ms",
                wait_s,
            )

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

"""REDIS_URL forms: redis://, rediss:// (TLS) and redis+sentinel:// (against a real Valkey Sentinel)."""

from __future__ import annotations

import pathlib
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool

from fovea.redis_server import RedisServer, free_port, server_binary
from fovea.v1 import model_pb2
from registry.config import RegistryConfig
from registry.redis_conn import SentinelTarget, connect, parse_sentinel_url
from registry.server import build_server
from tests.registry.helpers import Reg


def test_sentinel_urls_parse() -> None:
    assert parse_sentinel_url("redis+sentinel://s1:26380,s2,10.0.0.3:5000/mymaster/2") == SentinelTarget(
        hosts=(("s1", 26380), ("s2", 26379), ("10.0.0.3", 5000)), service="mymaster", db=2
    )
    t = parse_sentinel_url("redis+sentinel://user:p%40ss@s1:26379/cache?sentinel_password=sp")
    assert (t.username, t.password, t.sentinel_password, t.db) == ("user", "p@ss", "sp", 0)
    assert parse_sentinel_url("redis+sentinel://:secret@s1/m").password == "secret"
    for bad, expected in (
        ("redis+sentinel://s1:26379", "needs a service name"),
        ("redis+sentinel://s1:x/m", "bad port"),
        ("redis+sentinel://s1/m/notadb", "path must be"),
        ("redis+sentinel://s1,,s2/m", "empty host"),
        ("redis://s1/m", "not a redis\\+sentinel"),
    ):
        with pytest.raises(ValueError, match=expected):
            parse_sentinel_url(bad)


async def test_plain_and_tls_urls_build_the_right_clients() -> None:
    plain = connect("redis://:pw@127.0.0.1:6390/3")
    kwargs = plain.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == ("127.0.0.1", 6390, 3, "pw")
    assert kwargs["retry"] is not None and kwargs["socket_connect_timeout"] == 1.0
    tls = connect("rediss://cache.example:6380/0?ssl_cert_reqs=required")
    assert tls.connection_pool.connection_class is SSLConnection  # TLS: the bundled Valkey has none to test against
    assert tls.connection_pool.connection_kwargs["ssl_cert_reqs"] == "required"
    sentinel = connect("redis+sentinel://127.0.0.1:26379/mymaster/1")
    assert isinstance(sentinel.connection_pool, SentinelConnectionPool)
    assert sentinel.connection_pool.service_name == "mymaster"
    with pytest.raises(ValueError, match="unsupported Redis URL scheme"):
        connect("http://127.0.0.1:6379")
    for c in (plain, tls, sentinel):
        await c.aclose()


@pytest.fixture
def sentinel(tmp_path: pathlib.Path) -> Iterator[tuple[RedisServer, int]]:
    """A Valkey master and one Valkey Sentinel watching it (quorum 1)."""
    master = RedisServer(tmp_path / "master", appendonly=False).start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"  # Sentinel rewrites its config file, so it gets its own
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\nsentinel monitor fovea 127.0.0.1 {master.port} 1\n"
        f"sentinel auth-pass fovea {master.password}\n"  # the master requires its password
    )
    proc = subprocess.Popen(
        [server_binary(), str(conf), "--sentinel", "--logfile", str(tmp_path / "sentinel.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        probe = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        for _ in range(200):
            try:
                if probe.execute_command("SENTINEL", "get-master-addr-by-name", "fovea"):
                    break
            except redis.exceptions.RedisError:
                pass
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "sentinel.log").read_text()[-2000:])
            time.sleep(0.05)
        probe.close()
        yield master, port
    finally:
        proc.terminate()
        proc.wait(5)
        master.stop()


async def test_registry_runs_through_a_sentinel_url(
    sentinel: tuple[RedisServer, int], token: str, tmp_path: pathlib.Path
) -> None:
    master, sentinel_port = sentinel
    config = RegistryConfig(
        port=0,
        redis_url=f"redis+sentinel://:{master.password}@127.0.0.1:{sentinel_port}/fovea/2",
        artifact_dir=tmp_path / "artifacts",
        admin_tokens=token,
    )
    server = await build_server(config)
    reg = Reg(f"127.0.0.1:{server.port}", token)
    assert (await reg.register("colors")).version == 1
    assert [m.name for m in (await reg.call("ListModels", model_pb2.ListModelsRequest())).models] == ["colors"]
    direct = redis.Redis(host="127.0.0.1", port=master.port, db=2, password=master.password)
    assert direct.get("fovea:model:colors:seq") == b"1"  # it really went to the master Sentinel named, db 2
    direct.close()
    await reg.close()
    await server.stop(0.1)

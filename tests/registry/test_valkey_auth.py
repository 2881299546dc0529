"""Issue 18, fix 9: the embedded Valkey of `fovea up` and the tests requires a generated password,
which never appears on a command line."""

from __future__ import annotations

import pathlib
import socket
import stat

import pytest
import redis

from fovea.client import RegistryClient
from fovea.cluster import Cluster
from fovea.redis_server import PASSWORD_FILE, RedisServer
from fovea.v1 import model_pb2
from tests.tinymodels import color_model


def _raw_reply(port: int, command: bytes) -> bytes:
    """One command over a bare socket, as any local process could send it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(command)
        return s.recv(4096)


def _cmdline(pid: int) -> bytes:
    return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()


def test_embedded_valkey_refuses_clients_without_its_generated_password(tmp_path: pathlib.Path) -> None:
    server = RedisServer(tmp_path / "valkey", appendonly=False).start()
    try:
        assert server.proc is not None
        password_file = tmp_path / "valkey" / PASSWORD_FILE
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert password_file.read_text().strip() == server.password and len(server.password) >= 32
        assert _raw_reply(server.port, b"PING\r\n").startswith(b"-NOAUTH")
        assert _raw_reply(server.port, b"AUTH wrong-password\r\n").startswith(b"-WRONGPASS")
        assert f":{server.password}@" in server.url
        assert redis.Redis.from_url(server.url).ping()
        # Valkey rewrites its process title, so check the argv it was started with as well.
        argv = server.proc.args
        assert isinstance(argv, list), argv  # started from a list, not a shell string
        assert server.password not in " ".join(map(str, argv))
        assert server.password.encode() not in _cmdline(server.proc.pid)
        # A restart on the same data keeps the password the clients hold.
        server.stop()
        server.start()
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_fovea_cluster_services_use_the_password_and_no_command_line_shows_it(tmp_path: pathlib.Path) -> None:
    cluster = Cluster(tmp_path / "cluster")  # no redis_url: the embedded Valkey, as `fovea up` starts it
    try:
        url = cluster.start_redis()
        assert cluster.redis is not None and cluster.redis.proc is not None
        password = cluster.redis.password
        assert _raw_reply(cluster.redis.port, b"PING\r\n").startswith(b"-NOAUTH")
        registry = cluster.start_registry()
        with RegistryClient(registry.address, cluster.admin_token) as rc:
            mv = rc.register(color_model(), model_pb2.ModelVersion(name="colors"))
            assert [m.name for m in rc.list_models()] == ["colors"] and mv.version == 1
        assert redis.Redis.from_url(url).exists("fovea:model:colors:v:1")
        for pid in (cluster.redis.proc.pid, registry.proc.pid):
            assert password.encode() not in _cmdline(pid), pid
    finally:
        cluster.stop()

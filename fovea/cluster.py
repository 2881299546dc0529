"""Start Fovea services as separate processes on loopback: used by `fovea up` and the tests."""

from __future__ import annotations

import os
import pathlib
import secrets
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from fovea.redis_server import RedisServer, free_port

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    address: str
    log_path: pathlib.Path

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Cluster:
    """Processes of one local cluster; stop() ends them in reverse order."""

    data_dir: pathlib.Path
    redis_url: str = ""
    # One token per kind of caller, each with only its own rights (registry/service.py). Hex, so that a
    # token never starts with "-", which a command line would take for an option.
    admin_token: str = field(default_factory=lambda: secrets.token_hex(24))
    """The operator's: publishes models and creates API keys; no service holds it."""
    worker_token: str = field(default_factory=lambda: secrets.token_hex(24))
    """The workers' token at the registry."""
    gateway_token: str = field(default_factory=lambda: secrets.token_hex(24))
    """The gateways' token at the registry."""
    worker_call_token: str = field(default_factory=lambda: secrets.token_hex(24))
    """What gateways present to workers (and tests that call a worker directly)."""
    env: dict[str, str] = field(default_factory=dict)
    redis: RedisServer | None = None
    services: list[Service] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir = pathlib.Path(self.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def start_redis(self) -> str:
        if not self.redis_url:
            self.redis = RedisServer(self.data_dir / "redis").start()
            self.redis_url = self.redis.url
        return self.redis_url

    def _base_env(self) -> dict[str, str]:
        # FOVEA_NATIVE_BUILD picks the native build every service loads (scripts/sanitize.sh: build-asan).
        env = {k: v for k, v in os.environ.items() if not k.startswith("FOVEA_") or k == "FOVEA_NATIVE_BUILD"}
        env.update(PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(self.env)
        return env

    def start(
        self, name: str, module: str, env: dict[str, str], timeout_s: float = 120.0, argv: list[str] | None = None
    ) -> Service:
        """Run `python -m module` (or argv, e.g. a manifest's command), wait for its 'NAME: host:port' line."""
        log_path = self.data_dir / f"{name}.log"
        full_env = self._base_env()
        full_env.update(env)
        log = open(log_path, "ab")
        proc = subprocess.Popen(
            argv or [sys.executable, "-m", module], cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=log
        )
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        buffer = b""
        while b"\n" not in buffer:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} failed to start; log {log_path}:\n{tail}")
            if sel.select(0.1):
                chunk = os.read(proc.stdout.fileno(), 4096)
                buffer += chunk
        sel.close()
        line = buffer.split(b"\n", 1)[0].decode().strip()
        address = line.split(": ", 1)[1]
        service = Service(name, proc, address, log_path)
        self.services.append(service)
        return service

    def start_registry(self, port: int = 0, name: str = "registry", **env: str) -> Service:
        """A registry on this cluster's Redis; replicas (another name) share its Redis and artifact folder."""
        self.start_redis()
        return self.start(
            name,
            "registry",
            {
                "FOVEA_REGISTRY_PORT": str(port or free_port()),
                "FOVEA_REGISTRY_REDIS_URL": self.redis_url,
                "FOVEA_REGISTRY_ARTIFACT_DIR": str(self.data_dir / "artifacts"),
                "FOVEA_REGISTRY_ADMIN_TOKENS": self.admin_token,
                "FOVEA_REGISTRY_WORKER_TOKENS": self.worker_token,
                "FOVEA_REGISTRY_GATEWAY_TOKENS": self.gateway_token,
                **env,
            },
        )

    def start_worker(
        self, registry: str, models: Sequence[str] = (), name: str = "worker", port: int = 0, **env: str
    ) -> Service:
        """A worker serving `models` (FOVEA_WORKER_MODELS), or with none a pool worker, which serves what the
        registry's placement assigns it. Pool labels and budgets go in env, e.g. FOVEA_WORKER_LABELS="zone=a",
        FOVEA_WORKER_MEMORY_BUDGET_BYTES="300000000"."""
        port = port or free_port()
        return self.start(
            name,
            "worker",
            {
                "FOVEA_WORKER_PORT": str(port),
                "FOVEA_WORKER_REGISTRY_ADDRESS": registry,
                "FOVEA_WORKER_MODELS": ",".join(models),
                "FOVEA_WORKER_WORKER_ID": f"{name}-{port}",
                "FOVEA_WORKER_REGISTRY_TOKEN": self.worker_token,
                "FOVEA_WORKER_ACCEPTED_TOKENS": self.worker_call_token,
                **env,
            },
        )

    def start_gateway(self, registry: str, port: int = 0, name: str = "gateway", **env: str) -> Service:
        return self.start(
            name,
            "gateway",
            {
                "FOVEA_GATEWAY_PORT": str(port or free_port()),
                "FOVEA_GATEWAY_REGISTRY_ADDRESS": registry,
                "FOVEA_GATEWAY_REGISTRY_TOKEN": self.gateway_token,
                "FOVEA_GATEWAY_WORKER_TOKEN": self.worker_call_token,
                **env,
            },
        )

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

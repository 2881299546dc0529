"""Registry settings, from FOVEA_REGISTRY_* variables (REDIS_URL also works)."""

from __future__ import annotations

import pathlib

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from fovea.config import BaseConfig
from fovea.tokens import TokenTable


class RegistryConfig(BaseConfig):
    model_config = SettingsConfigDict(env_prefix="FOVEA_REGISTRY_", extra="ignore", populate_by_name=True)

    port: int = 8501
    """gRPC port."""
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("FOVEA_REGISTRY_REDIS_URL", "REDIS_URL", "redis_url"),
    )
    """redis://, rediss:// (TLS) or redis+sentinel://host:port[,host:port]/service_name/db."""
    artifact_dir: pathlib.Path = pathlib.Path("var/artifacts")
    """Directory of content-addressed artifacts (a PersistentVolume on Kubernetes)."""
    max_artifact_bytes: int = Field(default=1024 * 1024 * 1024, gt=0)
    """Largest artifact accepted by RegisterModel; the upload is refused as soon as it passes this."""
    chunk_bytes: int = Field(default=1024 * 1024, gt=0)
    """Chunk size of artifact downloads."""
    heartbeat_ttl_s: float = Field(default=5.0, gt=0)
    """A worker whose last heartbeat is older than this is dead (at most 5 s keeps failover quick)."""
    encryption_key_file: str = ""
    """File holding the AES-256 key for artifacts at rest; empty stores plaintext."""
    previous_encryption_key_file: str = ""
    """The key being rotated out: it only decrypts, for ReencryptArtifacts (`fovea model reencrypt`);
    an empty file means no rotation is under way."""
    watch_poll_s: float = Field(default=0.2, gt=0)
    """How often a worker watch looks for expired heartbeats."""
    max_alias_history: int = Field(default=20, ge=1)
    """Earlier states kept per alias for rollback."""
    worker_tokens: str = Field(default="", repr=False)
    """Tokens workers present, comma-separated, each the token or sha256:HEX (its SHA-256); list the old and
    the new one while rotating. A worker may heartbeat, read models and aliases, watch them and download."""
    gateway_tokens: str = Field(default="", repr=False)
    """Tokens gateways present, as worker_tokens. A gateway may verify API keys, watch keys, workers, models
    and aliases, and read models; it may not download artifacts."""
    admin_tokens: str = Field(default="", repr=False)
    """Operators' tokens, as worker_tokens: the rights of an admin API key without model patterns (create the
    first API key with one). No service holds one."""
    max_concurrent_uploads: int = Field(default=4, ge=1)
    """Uploads received and validated at once; more wait their turn (memory: this times max_artifact_bytes)."""

    # ---- placement (registry/placements.py) ----
    placement: bool = True
    """Run the placement loop on this replica (one replica leads at a time; off: this one never leads)."""
    placement_interval_s: float = Field(default=0.5, gt=0, le=60)
    """How often the placement leader reads heartbeats and models and writes assignments."""
    leader_ttl_s: float = Field(default=3.0, gt=0, le=600)
    """The leader's lease in Redis, renewed every tick: a successor takes over at most this long after a
    leader dies (at once when it stops cleanly)."""
    default_replicas: int = Field(default=1, ge=0, le=64)
    """Replicas of a model that was never scaled (`fovea model scale`)."""
    default_idle_unload_s: float = Field(default=300.0, gt=0, le=7 * 86400)
    """Seconds without calls before a model scaled to zero is unloaded, when its scale does not say."""
    scale_up_queue_per_replica: float = Field(default=4.0, gt=0, le=1e6)
    """Calls queued or running per ready replica that, held for scale_up_after_s, add a replica."""
    scale_up_after_s: float = Field(default=5.0, ge=0, le=86400)
    """How long the queue per replica must stay at or above scale_up_queue_per_replica."""
    scale_down_after_s: float = Field(default=30.0, ge=0, le=86400)
    """How long a model's queues must stay empty with no new calls before it loses a replica."""
    demand_ttl_s: float = Field(default=60.0, gt=0, le=86400)
    """How long a gateway's demand for a model (a call that found no ready replica) is remembered."""
    max_replicas_limit: int = Field(default=64, ge=1, le=10000)
    """The most replicas SetModelScale accepts for one model."""
    memory_estimate_factor: float = Field(default=6.0, gt=0, le=1000)
    """Host memory of a model no worker has measured yet: artifact size x this + memory_estimate_overhead_bytes.
    Measured here with ONNX Runtime 1 thread, after a batch-8 run: EfficientNet-Lite0 (18.7 MB file) took
    127 MB (6.8x), the tests' 450-byte models 0.2-0.4 MB; workers report the real figure once loaded."""
    memory_estimate_overhead_bytes: int = Field(default=16 * 1024 * 1024, ge=0, le=1 << 40)
    """The fixed part of the estimate above: session, arena and batcher buffers of even a tiny model."""

    def token_table(self) -> TokenTable:
        """The accepted service and operator tokens; raises ValueError for a malformed or shared entry."""
        return TokenTable({"worker": self.worker_tokens, "gateway": self.gateway_tokens, "admin": self.admin_tokens})

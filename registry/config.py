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

    def token_table(self) -> TokenTable:
        """The accepted service and operator tokens; raises ValueError for a malformed or shared entry."""
        return TokenTable({"worker": self.worker_tokens, "gateway": self.gateway_tokens, "admin": self.admin_tokens})

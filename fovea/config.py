"""Settings shared by every service; each service extends BaseConfig with its own prefix."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class BaseConfig(BaseSettings):
    """Fields every service has. Built once in main() and passed down."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 0
    """Port to listen on; 0 picks a free one (tests)."""
    internal_token: str = Field(default="", validation_alias=AliasChoices("FOVEA_INTERNAL_TOKEN", "internal_token"))
    """Shared secret for service-to-service calls; empty disables internal calls."""
    accepted_internal_token: str = Field(
        default="", validation_alias=AliasChoices("FOVEA_ACCEPTED_INTERNAL_TOKEN", "accepted_internal_token")
    )
    """A second internal token this service accepts but never sends: rotates internal_token with no
    downtime (deploy/README.md, "Rotating the internal token")."""
    log_level: str = "INFO"
    """Python logging level."""
    log_json: bool = True
    """Write logs as JSON lines."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message accepted or sent."""
    grace_s: float = 10.0
    """Time to finish in-flight calls on shutdown."""
    metrics_port: int = -1
    """Port of the Prometheus endpoint; -1 disables it, 0 picks a free one."""

    def accepted_internal_tokens(self) -> list[str]:
        return [t for t in (self.internal_token, self.accepted_internal_token) if t]

    max_pending_calls: int = 20_000
    """Calls that have arrived but not yet started, before gRPC cancels new ones. gRPC's own limit
    (1000) cancels a burst's excess with a bare CANCELLED that clients do not retry: lost requests.
    Past it, calls wait; the services' own limits (queue lengths, rate limits) answer with reasons."""


def server_options(max_message_bytes: int, max_pending_calls: int = 20_000) -> list[tuple[str, int]]:
    return [
        ("grpc.server.max_pending_requests", max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", max_pending_calls),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Accept the clients' keepalive pings (channel_options: every 10 s, even when idle);
        # the default policy answers them with GOAWAY "too_many_pings" and drops the connection.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]

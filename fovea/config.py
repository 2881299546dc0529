"""Settings shared by every service; each service extends BaseConfig with its own prefix."""

from __future__ import annotations

import pathlib

import grpc
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class BaseConfig(BaseSettings):
    """Fields every service has. Built once in main() and passed down."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 0
    """Port to listen on; 0 picks a free one (tests)."""
    legacy_internal_token: str = Field(default="", validation_alias="FOVEA_INTERNAL_TOKEN", repr=False)
    """Read only to refuse it: the one shared token gave every service every right (see check_no_shared_token)."""
    legacy_accepted_internal_token: str = Field(
        default="", validation_alias="FOVEA_ACCEPTED_INTERNAL_TOKEN", repr=False
    )
    """Read only to refuse it, like legacy_internal_token."""
    tls_cert_file: str = ""
    """Certificate chain (PEM) this service serves TLS with; set with tls_key_file. It is also the client
    certificate this service presents when it dials with TLS (tls_ca_file) and the other side asks for one."""
    tls_key_file: str = ""
    """Private key (PEM) of tls_cert_file."""
    tls_client_ca_file: str = ""
    """CA bundle (PEM) for client certificates; set, every caller must present one it signed (mutual TLS)."""
    tls_ca_file: str = ""
    """CA bundle (PEM) that signed the certificates of the Fovea services this one dials (the registry,
    workers); set, those hops use TLS and check the certificate against the address dialed."""
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

    @model_validator(mode="after")
    def check_no_shared_token(self) -> BaseConfig:
        if self.legacy_internal_token or self.legacy_accepted_internal_token:
            raise ValueError(
                "FOVEA_INTERNAL_TOKEN and FOVEA_ACCEPTED_INTERNAL_TOKEN are no longer read: each kind of service "
                "has its own token, with only the rights it needs (deploy/README.md, 'Service tokens'); unset them"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file are set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS for this service's port, mutual when tls_client_ca_file is set; None serves plaintext."""
        if not self.tls_cert_file:
            return None
        pair = [(_read(self.tls_key_file), _read(self.tls_cert_file))]
        if self.tls_client_ca_file:
            return grpc.ssl_server_credentials(
                pair, root_certificates=_read(self.tls_client_ca_file), require_client_auth=True
            )
        return grpc.ssl_server_credentials(pair)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS for the hops this service dials (registry, workers); None dials plaintext."""
        if not self.tls_ca_file:
            return None
        cert = _read(self.tls_cert_file) if self.tls_cert_file else None
        key = _read(self.tls_key_file) if self.tls_key_file else None
        return grpc.ssl_channel_credentials(_read(self.tls_ca_file), private_key=key, certificate_chain=cert)

    max_pending_calls: int = 20_000
    """Calls that have arrived but not yet started, before gRPC cancels new ones. gRPC's own limit
    (1000) cancels a burst's excess with a bare CANCELLED that clients do not retry: lost requests.
    Past it, calls wait; the services' own limits (queue lengths, rate limits) answer with reasons."""


def _read(path: str) -> bytes:
    return pathlib.Path(path).read_bytes()


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

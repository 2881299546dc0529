"""Gateway settings, from FOVEA_GATEWAY_* variables."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from fovea.config import BaseConfig

# The first and the longest wait before dialling a worker again: GatewayConfig's defaults, and those of the parts
# built without one (gRPC's own waits grow to 120 s, long past a restarted worker's return).
RECONNECT_S = (0.2, 2.0)


def reconnect_ms(waits_s: tuple[float, float]) -> tuple[int, int]:
    """The waits in whole milliseconds, as gRPC's channel arguments take them."""
    return (round(waits_s[0] * 1000), round(waits_s[1] * 1000))


class GatewayConfig(BaseConfig):
    model_config = SettingsConfigDict(env_prefix="FOVEA_GATEWAY_", extra="ignore", populate_by_name=True)

    port: int = 8500
    """The one public gRPC port (0 picks a free one), served by the native front (gateway/native) with TLS or
    mutual TLS from the tls_* settings. It answers ModelInfer and Classify itself and relays every other call to
    the Python server, which listens on no TCP port, only on a unix socket in a private directory."""
    fast_threads: int = 1
    """Threads of the native front, each running its calls from start to end. One adds the least latency per
    call and forwarded about 2,700 600 KB tensors a second on a 16-core machine; two, about 4,500, with
    calls then passing between threads (docs/bench/README.md)."""
    registry_address: str = "127.0.0.1:8501"
    """Registry host:port."""
    registry_token: str = Field(default="", repr=False)
    """This gateway's token on its calls to the registry (listed in the registry's gateway_tokens): API key
    checks, watches of keys, workers and models, model metadata; no downloads, aliases or keys."""
    worker_token: str = Field(default="", repr=False)
    """The token this gateway presents to workers (listed in their accepted_tokens). A token of its own, so
    that no worker holds the gateway's registry token."""
    redis_url: str = ""
    """Redis for rate limits shared by all replicas; empty keeps limits per replica."""
    max_images_per_call: int = 64
    """Most images in one Classify call."""
    max_images_per_forward: int = 32
    """Most images sent to a worker in one call (at most the workers' max_batch_size); larger calls are split."""
    max_image_pixels: int = 40_000_000
    """Largest image, in pixels, checked from its header."""
    max_image_bytes: int = 20 * 1024 * 1024
    """Largest encoded image."""
    default_top_k: int = 5
    """Labels per image when the caller asks for none."""
    max_top_k: int = 100
    """Most labels per image: Classify's top_k, and the k of a ModelInfer's classification parameter (the gateway
    refuses more; the worker also checks k against the model's output width)."""
    default_deadline_ms: int = 30_000
    """Deadline for calls that carry none."""
    max_deadline_ms: int = 300_000
    """Longest deadline honoured; longer ones are cut to this."""
    key_cache_ttl_s: float = 300.0
    """How long a verified key stays cached; revocations still apply within a second through the watch."""
    latest_cache_s: float = 1.0
    """How long a model's latest version (used when it has no production alias) is cached."""
    eject_after_failures: int = 3
    """Consecutive connection failures before a worker is set aside."""
    eject_s: float = 5.0
    """How long an ejected worker is set aside before the first health probe (then doubling, up to 30 s)."""
    worker_reconnect_min_s: float = Field(default=RECONNECT_S[0], ge=0.001, le=300)
    """First wait before dialling a worker again after its connection failed (then growing 1.6 times a try)."""
    worker_reconnect_max_s: float = Field(default=RECONNECT_S[1], ge=0.001, le=300)
    """Longest wait before dialling a worker again (gRPC's own default is 120 s). A worker the registry hears
    from is dialled at once whatever the wait, so a restarted worker is reached as soon as it says it is ready."""
    unread_window_bytes: int = 64 * 1024
    """What a caller may send on one call before the gateway reads its body (the HTTP/2 stream window, at the
    front and at the Python server behind it): bodies are read only after the credentials are checked, so this
    bounds the memory an unauthenticated call costs, besides its metadata."""
    max_calls_per_key: int = Field(default=1024, ge=0)
    """Most calls of one API key in progress at once on the public port (streams included; 0: no limit), below
    max_pending_calls, so that one key's slow or idle calls cannot lock the other callers out; more get
    RESOURCE_EXHAUSTED. Calls without a key (health, reflection) count as one key."""
    stream_window: int = 8
    """Requests of one ClassifyStream in flight at once."""
    tls_cert_file: str = ""
    """Server certificate (PEM); set with tls_key_file to serve TLS."""
    tls_key_file: str = ""
    """Server private key (PEM)."""
    tls_client_ca_file: str = ""
    """CA bundle for client certificates; set to require mutual TLS."""
    refused_key_cache_s: float = 1.0
    """How long a refused key is remembered before the registry is asked again."""
    min_role: str = "infer"
    """Lowest key role this gateway accepts: infer, publish or admin (e.g. publish for a staging gateway)."""
    access_log: bool = True
    """Write one log line per call (method, status, milliseconds, request id, model)."""
    metrics_host: str = "127.0.0.1"
    """Address of the Prometheus endpoint (metrics_port enables it)."""
    rate_limit_timeout_s: float = 0.25
    """Longest wait for Redis when checking a rate limit; past it the call is let through."""

    # Cold starts (gateway/placement.py): a call whose model has no ready worker waits for placement to load it.
    cold_start_wait_s: float = Field(default=60.0, ge=0, le=3600)
    """Longest a call waits for a worker to load its model (within its own deadline); 0 never waits."""
    max_cold_waiters: int = Field(default=1024, ge=0, le=1_000_000)
    """Most calls waiting for cold starts at once, over all models; more get RESOURCE_EXHAUSTED."""
    demand_cache_s: float = Field(default=0.5, ge=0, le=60)
    """How long the registry's answer to a DemandModel is reused for the other calls waiting for the model."""
    demand_refresh_s: float = Field(default=1.0, gt=0, le=60)
    """While calls wait, how often the demand is renewed (which also tells whether the model became unplaceable)."""

    # HTTP/REST (gateway/http): the Open Inference Protocol's REST binding and the curl image endpoint.
    http_port: int = -1
    """HTTP port (KServe v2 REST and /v1/models/NAME:classify), on `host`, beside the gRPC port. -1 turns it off
    (the default: replicas and tests on one host would otherwise fight over one port), 0 picks a free one;
    8000 is Triton's HTTP port. It serves TLS with the gRPC port's certificate when tls_cert_file is set."""
    http_max_body_bytes: int = 64 * 1024 * 1024
    """Largest request body; a larger Content-Length gets 413 before any of the body is read."""
    http_max_json_bytes: int = 16 * 1024 * 1024
    """Largest JSON part of an inference request (the whole body for a JSON-only one, the header for the binary
    data extension): parsed JSON numbers cost several times their text."""
    http_max_concurrent: int = 256
    """Most HTTP requests handled at once; more get 503 at once."""
    http_max_calls_per_key: int = Field(default=64, ge=0)
    """Most HTTP requests of one API key handled at once (0: no limit), below http_max_concurrent, so that one
    key's slow bodies cannot hold every slot for the client timeout; more get 429 with Retry-After."""
    http_client_timeout_s: float = 30.0
    """Longest a client may take to send a request's body, or to take its answer; then the connection closes."""
    http_idle_timeout_s: float = 30.0
    """Longest a connection may wait between requests, or take to send a request's headers (slow senders)."""
    http_lingering_s: float = 2.0
    """After an answer sent before the body was read (a refusal), how long the rest is read and dropped so that
    the client sees the answer rather than a reset; then the connection closes."""

    @model_validator(mode="after")
    def check_reconnect(self) -> GatewayConfig:
        if self.worker_reconnect_min_s > self.worker_reconnect_max_s:
            raise ValueError("worker_reconnect_min_s is at most worker_reconnect_max_s")
        return self

    @property
    def reconnect_s(self) -> tuple[float, float]:
        """The first and the longest wait before dialling a worker again."""
        return (self.worker_reconnect_min_s, self.worker_reconnect_max_s)

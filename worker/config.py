"""Worker settings, from FOVEA_WORKER_* variables."""

from __future__ import annotations

import os
import pathlib
import socket
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from fovea.config import BaseConfig
from fovea.names import NAME_RE
from fovea.tokens import check_plain_token, token_list

MAX_LABELS = 16
"""Labels a worker may carry, device= included."""


def _default_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerConfig(BaseConfig):
    model_config = SettingsConfigDict(env_prefix="FOVEA_WORKER_", extra="ignore", populate_by_name=True)

    port: int = 8502
    """The worker's one gRPC port, served by its native (C++) front (worker/native/build.sh builds it;
    scripts/setup.sh runs that): raw-tensor ModelInfer in C++, every other call relayed to the worker's
    Python server on a private unix socket. 0 picks a free port."""
    worker_id: str = Field(default_factory=_default_id)
    """Id in heartbeats; defaults to host-pid."""
    advertise_address: str = ""
    """host:port the gateways dial; defaults to host:port (the pod IP on Kubernetes). {ip} and
    {hostname} stand for this machine's address and name, so replicas can share one setting
    (compose: "{ip}:8502")."""
    registry_address: str = "127.0.0.1:8501"
    """Registry host:port."""
    registry_token: str = Field(default="", repr=False)
    """This worker's token on its calls to the registry (listed in the registry's worker_tokens): heartbeats,
    model metadata and watches, artifact downloads, nothing else."""
    accepted_tokens: str = Field(default="", repr=False)
    """Tokens of the callers this worker serves (the gateways' worker_token), comma-separated: the old and the
    new one while rotating. Plain tokens, not hashes: the fast port compares them as sent."""
    models: Annotated[list[str], NoDecode] = []
    """Models to serve, comma-separated: NAME (follows production), NAME:ALIAS or NAME@VERSION."""
    providers: Annotated[list[str], NoDecode] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    """Execution providers in priority order (Tensorrt-, CUDA-, CPUExecutionProvider)."""
    require_gpu: bool = False
    """Fail to start instead of falling back to the CPU when a GPU provider was asked for."""
    device_id: int = 0
    """GPU index for CUDA and TensorRT."""
    cudnn_max_workspace: bool = True
    """Let cuDNN use as much workspace as its fastest convolution algorithm wants (CUDA provider)."""
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    """cuDNN algorithm search: EXHAUSTIVE, HEURISTIC or DEFAULT (CUDA provider)."""
    gpu_mem_limit_bytes: int = 0
    """Cap on the CUDA provider's memory arena; 0 means no cap."""
    trt_fp16: bool = False
    """Let TensorRT use fp16 kernels."""
    trt_cache_dir: str = ""
    """TensorRT engine cache directory; empty disables the cache."""
    trt_max_workspace_bytes: int = 0
    """TensorRT builder workspace; 0 keeps ONNX Runtime's default."""
    provider_options: dict[str, dict[str, str]] = {}
    """Extra options per provider, as JSON.

    E.g. {"CUDAExecutionProvider": {"arena_extend_strategy": "kSameAsRequested"}}."""
    intra_op_threads: int = 0
    """ONNX Runtime intra-op threads; 0 lets it choose (one per core)."""
    inter_op_threads: int = 1
    """ONNX Runtime inter-op threads."""
    graph_optimization: str = "all"
    """disable, basic, extended or all."""
    thread_spinning: bool = True
    """Let ONNX Runtime's intra-op threads spin while waiting for work (faster alone, slower beside busy neighbours)."""
    spin_only_in_run: bool = True
    """Stop the spinning the moment a run ends (ONNX Runtime's session.force_spinning_stop), so that idle pool
    threads do not take the cores from the threads that answer calls and take the next batch in."""
    cpu_mem_arena: bool = True
    """Use ONNX Runtime's CPU memory arena."""
    instances: int = 1
    """Sessions (and executor threads) per model version."""
    model_settings: dict[str, dict[str, int]] = {}
    """Per-model instances and intra-op threads, as JSON, like Triton's instance_group:
    {"cifar-cnn": {"instances": 2, "intra_op_threads": 1}}. A small model serves more calls as several
    one-thread instances (no thread waits for another at every operator); a big one answers sooner as one
    instance with all the threads. "alone_threads": N adds a session with N threads that the fast port
    uses for a batch that would run by itself (no other instance busy, nothing queued), so that
    {"instances": 2, "intra_op_threads": 1, "alone_threads": 2} gives one-thread throughput under load
    and two-thread latency to a lone request, never running more than two threads at once."""

    @field_validator("jpeg_decode_margin")
    @classmethod
    def _check_margin(cls, v: float) -> float:
        if 0 < v < 1:
            raise ValueError(
                "jpeg_decode_margin: 0 (always decode in full) or at least 1 (never decode smaller than needed)"
            )
        return v

    @field_validator("model_settings")
    @classmethod
    def _check_model_settings(cls, v: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        for name, settings in v.items():
            unknown = set(settings) - {"instances", "intra_op_threads", "alone_threads"}
            if unknown:
                raise ValueError(
                    f"model_settings[{name!r}]: unknown {sorted(unknown)}; "
                    "allowed: instances, intra_op_threads, alone_threads"
                )
            if (
                settings.get("instances", 1) < 1
                or min(settings.get("intra_op_threads", 0), settings.get("alone_threads", 0)) < 0
            ):
                raise ValueError(f"model_settings[{name!r}]: instances must be >= 1, threads >= 0")
        return v

    def for_model(self, name: str) -> WorkerConfig:
        """This config with the model's own instances and threads, if model_settings has any."""
        settings = {k: v for k, v in self.model_settings.get(name, {}).items() if k != "alone_threads"}
        return self.model_copy(update=settings) if settings else self

    def alone_threads(self, name: str) -> int:
        """Threads of the session a lone batch of this model runs on (fast port); 0 = none."""
        return self.model_settings.get(name, {}).get("alone_threads", 0)

    max_batch_size: int = 32
    """Largest batch, counted in samples."""
    max_queue_delay_us: int = 0
    """How long to wait for more samples once one arrives; 0 batches whatever is queued."""
    preferred_batch_sizes: Annotated[list[int], NoDecode] = []
    """Batch sizes to stop collecting at, when reached before max_batch_size."""
    warmup_batch_sizes: Annotated[list[int], NoDecode] = []
    """Batch sizes run once before a version is ready. Empty: every size up to max_batch_size on a GPU provider,
    where cuDNN searches its convolution algorithms once per shape (seconds under load), and 1 on the CPU."""
    pad_batches: Literal["gpu", "always", "never"] = "gpu"
    """Pad each batch with zeros up to the next of batch_buckets and run it on a session kept for that size:
    "gpu" (on GPU providers only), "always" or "never". ONNX Runtime's CUDA provider re-plans every convolution
    whenever a session's batch size differs from its previous run (0.3 to 1 s for EfficientNet-Lite0 on an H200,
    bench/gpu/shape_change.py), so batches of varying sizes on one session ran at about 2 a second. The cost:
    one session, with its own copy of the weights, per size and instance, and the padded samples' compute."""
    batch_buckets: Annotated[list[int], NoDecode] = []
    """Batch sizes for pad_batches; empty: the powers of two below max_batch_size, and max_batch_size."""
    max_queue_len: int = 1024
    """Queued requests per model version before RESOURCE_EXHAUSTED."""
    max_image_pixels: int = 40_000_000
    """Largest decoded image, in pixels."""
    max_images_per_request: int = 64
    """Most images (samples) in one request."""
    max_request_pixels: int = Field(default=200_000_000, ge=1)
    """Most pixels the images of one request may decode to, summed (a JPEG counted at the reduced scale it decodes
    at, jpeg_decode_margin), checked from their headers before any is decoded: decoding is the costliest step and
    runs on a shared pool, so this bounds what one call can take from the others. 64 PNGs of 12 megapixels (768
    million, about a minute of one core here) are refused; 64 phone photos at 1/4 scale (48 million) pass."""
    jpeg_decode_margin: float = Field(default=2.0, ge=0, le=64)
    """Decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg-turbo's DCT scaling) when that still leaves this many
    times the size the model's preprocessing resizes to; 0 always decodes in full. At 1 a 12-megapixel photo
    decodes at 1/8, whose box-averaged pixels then resized a little changed the model's top-1 on 4.6% of the
    files checked (bench/images/jpeg_scale.py); at 2 it decodes at 1/4 and agrees as a re-encoded file does."""
    decode_threads: int = Field(default=2, ge=1, le=256)
    """Threads that decode and preprocess images: each takes one image call at a time off the native front's
    image queue (worker/decoding.py) and decodes its first image; a call's further images go to a pool of as
    many threads again."""
    heartbeat_interval_s: float = 1.0
    """Time between heartbeats to the registry."""
    unload_delay_s: float = 5.0
    """How long a version that left its alias (or a model no longer assigned) keeps serving before it is unloaded."""

    # ---- the pool (issue #22): models placement assigns ------------------------------------------
    join_pool: bool | None = None
    """Take the models the registry's placement assigns (a pool worker). Unset: true exactly when models is
    empty, so a worker started with a fixed list keeps serving only that list."""
    labels: Annotated[dict[str, str], NoDecode] = {}
    """Labels a model's pool is matched against, "k=v,k=v" (e.g. "gpu=h100,zone=a"); device=cpu or device=gpu
    is added from the providers this worker can run."""
    memory_budget_bytes: int = Field(default=0, ge=0, le=1 << 50)
    """Host memory the worker offers placement for models; 0: 80% of the container's limit
    (/sys/fs/cgroup/memory.max) or of MemTotal, less the process's resident size at start."""
    device_memory_budget_bytes: int = Field(default=0, ge=0, le=1 << 50)
    """GPU memory offered for models; 0: 90% of the device's memory on a GPU worker (always 0 on the CPU)."""
    load_retry_s: float = Field(default=1.0, gt=0, le=3600)
    """After an assigned model fails to load, the wait before the next try; doubled per failure."""
    load_retry_max_s: float = Field(default=60.0, gt=0, le=86400)
    """Longest wait between tries of a model that keeps failing to load."""
    max_assigned_models: int = Field(default=256, ge=1, le=100_000)
    """Most models a heartbeat answer may assign; the rest are ignored (and logged)."""

    @field_validator("labels", mode="before")
    @classmethod
    def _parse_labels(cls, v: object) -> object:
        if not isinstance(v, str):
            return v
        out: dict[str, str] = {}
        for part in (p.strip() for p in v.split(",")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"labels: {part[:40]!r} is not KEY=VALUE (e.g. gpu=h100,zone=a)")
            out[key.strip()] = value.strip()
        return out

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_LABELS - 1:
            raise ValueError(f"labels: at most {MAX_LABELS - 1} (device= is added to them), got {len(v)}")
        for key, value in v.items():
            for what, text in (("name", key), ("value", value)):
                if not NAME_RE.fullmatch(text) or ".." in text:
                    raise ValueError(
                        f"labels: invalid {what} {text[:40]!r}: use 1-63 lowercase letters, digits, '.', '_' or '-'"
                    )
        if "device" in v:
            raise ValueError("labels: device= is set by the worker itself (cpu or gpu, from its providers)")
        return v

    @property
    def pooled(self) -> bool:
        """Whether this worker joins the pool (see join_pool)."""
        return not self.models if self.join_pool is None else self.join_pool

    def label_map(self, gpu: bool) -> dict[str, str]:
        """The labels heartbeats carry: the configured ones and device=cpu|gpu."""
        return {**self.labels, "device": "gpu" if gpu else "cpu"}

    encryption_key_file: str = ""
    """AES-256 key for artifacts encrypted at rest; decrypted in memory only."""
    previous_encryption_key_file: str = ""
    """During a key rotation, the old key, so that artifacts not yet re-encrypted still load;
    an empty file means no rotation is under way."""
    drain_linger_s: float = 0.5
    """On shutdown, how long to keep refusing new calls with a retryable UNAVAILABLE before closing the port;
    calls already on the wire then get a status a gateway retries, not CANCELLED."""
    default_deadline_ms: int = 30_000
    """Deadline for calls that carry none."""

    @field_validator("models", "providers", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("preferred_batch_sizes", "warmup_batch_sizes", "batch_buckets", mode="before")
    @classmethod
    def _split_ints(cls, v: object) -> object:
        if isinstance(v, str):
            return [int(p) for p in v.split(",") if p.strip()]
        return v

    @field_validator("accepted_tokens")
    @classmethod
    def _check_accepted(cls, v: str) -> str:
        for token in token_list(v):
            check_plain_token(token, "accepted_tokens")
        return v

    def accepted_token_list(self) -> list[str]:
        return token_list(self.accepted_tokens)

    def tls_pems(self) -> tuple[bytes, bytes, bytes] | None:
        """(certificate chain, key, client CA or b"") for the native front's TLS, as server_credentials() reads
        them (mutual TLS when a client CA is set); None serves plaintext."""
        if not self.tls_cert_file:
            return None
        ca = pathlib.Path(self.tls_client_ca_file).read_bytes() if self.tls_client_ca_file else b""
        return pathlib.Path(self.tls_cert_file).read_bytes(), pathlib.Path(self.tls_key_file).read_bytes(), ca

    def address(self, port: int) -> str:
        if not self.advertise_address:
            return f"{self.host}:{port}"
        out = self.advertise_address
        if "{hostname}" in out:
            out = out.replace("{hostname}", socket.gethostname())
        if "{ip}" in out:
            out = out.replace("{ip}", socket.gethostbyname(socket.gethostname()))
        return out

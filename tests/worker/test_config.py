"""Worker settings that are computed rather than read as they are."""

from __future__ import annotations

import socket

import pytest

from worker.config import WorkerConfig


def test_advertise_address_placeholders_let_replicas_share_one_setting() -> None:
    ip = socket.gethostbyname(socket.gethostname())
    assert WorkerConfig(advertise_address="{ip}:8502").address(8502) == f"{ip}:8502"
    assert WorkerConfig(advertise_address="{hostname}:9000").address(8502) == f"{socket.gethostname()}:9000"
    assert WorkerConfig(advertise_address="10.0.0.7:8502").address(1) == "10.0.0.7:8502"
    assert WorkerConfig(host="127.0.0.1").address(8502) == "127.0.0.1:8502"


def test_model_settings_override_instances_and_threads_per_model() -> None:
    config = WorkerConfig(
        instances=1, intra_op_threads=2, model_settings={"cifar": {"instances": 2, "intra_op_threads": 1}}
    )
    small = config.for_model("cifar")
    assert (small.instances, small.intra_op_threads) == (2, 1)
    assert config.for_model("efficientnet") is config
    with pytest.raises(ValueError, match="unknown"):
        WorkerConfig(model_settings={"cifar": {"threads": 1}})
    with pytest.raises(ValueError, match="instances must be"):
        WorkerConfig(model_settings={"cifar": {"instances": 0}})


def test_warmup_runs_every_batch_size_on_a_gpu_and_one_on_the_cpu() -> None:
    from fovea.v1 import model_pb2
    from worker.loading import warmup_sizes

    dynamic = model_pb2.ModelVersion(name="m", inputs=[model_pb2.TensorSpec(name="x", shape=[-1, 3, 8, 8])])
    fixed = model_pb2.ModelVersion(name="m", inputs=[model_pb2.TensorSpec(name="x", shape=[1, 3, 8, 8])])
    config = WorkerConfig(max_batch_size=4)
    assert warmup_sizes(config, "CUDAExecutionProvider", dynamic) == [1, 2, 3, 4]
    assert warmup_sizes(config, "CPUExecutionProvider", dynamic) == [1]
    assert warmup_sizes(config, "CUDAExecutionProvider", fixed) == [1]
    # as read from the environment; the field's before-validator splits the text, which __init__'s signature
    # cannot say
    chosen = WorkerConfig(max_batch_size=4, warmup_batch_sizes="4,2,9,2")  # type: ignore[arg-type]
    assert warmup_sizes(chosen, "CPUExecutionProvider", dynamic) == [2, 4]
    # a session per batch size (pad_batches): each runs its own size once
    assert warmup_sizes(config, "CUDAExecutionProvider", dynamic, [1, 2, 4]) == [1, 2, 4]
    assert warmup_sizes(chosen, "CUDAExecutionProvider", dynamic, [1, 2, 4]) == [2, 4]  # the setting wins

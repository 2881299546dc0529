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
    config = WorkerConfig(instances=1, intra_op_threads=2,
                          model_settings={"cifar": {"instances": 2, "intra_op_threads": 1}})
    small = config.for_model("cifar")
    assert (small.instances, small.intra_op_threads) == (2, 1)
    assert config.for_model("efficientnet") is config
    with pytest.raises(ValueError, match="unknown"):
        WorkerConfig(model_settings={"cifar": {"threads": 1}})
    with pytest.raises(ValueError, match="instances must be"):
        WorkerConfig(model_settings={"cifar": {"instances": 0}})

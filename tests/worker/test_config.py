"""Worker settings that are computed rather than read as they are."""

from __future__ import annotations

import socket

from worker.config import WorkerConfig


def test_advertise_address_placeholders_let_replicas_share_one_setting() -> None:
    ip = socket.gethostbyname(socket.gethostname())
    assert WorkerConfig(advertise_address="{ip}:8502").address(8502) == f"{ip}:8502"
    assert WorkerConfig(advertise_address="{hostname}:9000").address(8502) == f"{socket.gethostname()}:9000"
    assert WorkerConfig(advertise_address="10.0.0.7:8502").address(1) == "10.0.0.7:8502"
    assert WorkerConfig(host="127.0.0.1").address(8502) == "127.0.0.1:8502"

"""Host memory: this process's resident size, and the budget a pool worker offers placement."""

from __future__ import annotations

import os
import pathlib

CGROUP_MAX = pathlib.Path("/sys/fs/cgroup/memory.max")
MEMINFO = pathlib.Path("/proc/meminfo")
STATM = pathlib.Path("/proc/self/statm")
AUTO_SHARE = 0.8
"""Share of the machine's (or container's) memory an automatic budget starts from."""
DEVICE_SHARE = 0.9
"""Share of a GPU's memory an automatic device budget offers (the rest: CUDA context, fragmentation)."""


def rss_bytes() -> int:
    """Resident set size of this process now; 0 where /proc is not there."""
    try:
        return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def machine_bytes(cgroup_max: pathlib.Path = CGROUP_MAX, meminfo: pathlib.Path = MEMINFO) -> int:
    """The container's memory limit when it has one (cgroup v2 memory.max is a number), else MemTotal."""
    try:
        text = cgroup_max.read_text().strip()
        if text.isdigit():
            return int(text)
    except OSError:
        pass
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def host_budget(configured: int, machine: int | None = None, rss: int | None = None) -> int:
    """The host memory models may take: the configured budget, or (0) 80% of the machine less what the
    process already holds at start (its interpreter, ONNX Runtime, the fast port)."""
    if configured > 0:
        return configured
    machine = machine_bytes() if machine is None else machine
    rss = rss_bytes() if rss is None else rss
    return max(0, int(machine * AUTO_SHARE) - rss)


def device_budget(configured: int, gpu: bool, device_total: int) -> int:
    """The device memory models may take: the configured budget, or (0) 90% of the GPU's; 0 without a GPU."""
    if not gpu:
        return 0
    if configured > 0:
        return configured
    return int(max(0, device_total) * DEVICE_SHARE)

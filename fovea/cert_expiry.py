"""When the TLS certificates a service was configured with expire, for its Prometheus endpoint.

Read at scrape time (the files may be replaced by a rotation), cached by modification time so that a scrape
costs a stat per file. A bundle's expiry is that of its first certificate to expire.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

MAX_CERT_FILE_BYTES = 1 << 20  # a CA bundle is kilobytes; a larger file is not read at every scrape


def not_after(path: str) -> float | None:
    """Unix time at which the first certificate in the PEM file expires; None if it holds none."""
    from cryptography import x509

    with open(path, "rb") as f:
        data = f.read(MAX_CERT_FILE_BYTES + 1)
    if len(data) > MAX_CERT_FILE_BYTES:
        raise ValueError(f"over {MAX_CERT_FILE_BYTES} bytes")
    certs = x509.load_pem_x509_certificates(data)
    return min(c.not_valid_after_utc.timestamp() for c in certs) if certs else None


class CertificateExpiry:
    """A collector: <metric>{file, role} = expiry time of each configured certificate file."""

    def __init__(self, metric: str, files: dict[str, str]) -> None:
        """files maps a role (server, client_ca, ca) to a path; empty paths are left out."""
        self.metric = metric
        self.files = {role: path for role, path in files.items() if path}
        self._cache: dict[str, tuple[float, float | None]] = {}

    def _expiry(self, path: str) -> float | None:
        try:
            mtime = os.stat(path).st_mtime
            hit = self._cache.get(path)
            if hit is not None and hit[0] == mtime:
                return hit[1]
            value = not_after(path)
        except (OSError, ValueError) as exc:  # an unreadable file is left out, never a failed scrape
            logger.warning("no expiry for certificate file %s: %s", path, exc)
            return None
        self._cache[path] = (mtime, value)
        return value

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            self.metric,
            "Unix time at which the first certificate of a configured TLS file expires",
            labels=["file", "role"],
        )
        for role, path in sorted(self.files.items()):
            value = self._expiry(path)
            if value is not None:
                family.add_metric([os.path.basename(path), role], value)
        yield family

"""Fovea's shared core: errors, config, logging, RPC helpers and generated stubs.

Services import this package; it imports no service.
"""

__version__ = "0.1.0"

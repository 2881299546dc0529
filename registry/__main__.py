"""python -m registry: run the registry service."""

from __future__ import annotations

from fovea import codegen


def main() -> None:
    codegen.require()
    from fovea.serve import serve_forever
    from registry.config import RegistryConfig
    from registry.server import build_server

    config = RegistryConfig()
    serve_forever("registry", config, build_server, lambda srv: f"{config.host}:{srv.port}")


if __name__ == "__main__":
    main()

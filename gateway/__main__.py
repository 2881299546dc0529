"""python -m gateway: run the gateway service."""

from __future__ import annotations

from fovea import codegen


def main() -> None:
    codegen.require()
    from fovea.serve import serve_forever
    from gateway.config import GatewayConfig
    from gateway.server import build_server

    config = GatewayConfig()
    serve_forever("gateway", config, build_server, lambda srv: f"{config.host}:{srv.port}")


if __name__ == "__main__":
    main()

"""python -m gateway: run a gateway."""

from __future__ import annotations

from fovea import codegen
from fovea.log import configure_logging


def main() -> None:
    codegen.ensure()
    from fovea.serve import run_service, run_until_signal
    from gateway.config import GatewayConfig
    from gateway.server import build_server

    config = GatewayConfig()
    configure_logging("gateway", config.log_level, config.log_json)

    async def run() -> None:
        srv = await build_server(config)
        print(f"gateway: {config.host}:{srv.port}", flush=True)
        await run_until_signal(lambda: srv.stop(config.grace_s))

    run_service(run)


if __name__ == "__main__":
    main()

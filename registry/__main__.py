"""python -m registry: run the registry service."""

from __future__ import annotations

from fovea import codegen
from fovea.log import configure_logging


def main() -> None:
    codegen.ensure()
    from fovea.serve import run_service, run_until_signal
    from registry.config import RegistryConfig
    from registry.server import build_server

    config = RegistryConfig()
    configure_logging("registry", config.log_level, config.log_json)

    async def run() -> None:
        srv = await build_server(config)
        print(f"registry: {config.host}:{srv.port}", flush=True)
        await run_until_signal(lambda: srv.stop(config.grace_s))

    run_service(run)


if __name__ == "__main__":
    main()

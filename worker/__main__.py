"""python -m worker: run a worker."""

from __future__ import annotations

from fovea import codegen
from fovea.log import configure_logging


def main() -> None:
    codegen.ensure()
    from fovea.serve import run_service, run_until_signal
    from worker.config import WorkerConfig
    from worker.server import build_server

    config = WorkerConfig()
    configure_logging("worker", config.log_level, config.log_json)

    async def run() -> None:
        srv = await build_server(config)
        print(f"worker: {config.address(srv.port)}", flush=True)
        await run_until_signal(lambda: srv.stop(config.grace_s))

    run_service(run)


if __name__ == "__main__":
    main()

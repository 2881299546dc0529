"""python -m worker: run the worker service."""

from __future__ import annotations

from fovea import codegen


def main() -> None:
    codegen.require()
    from fovea.serve import serve_forever
    from worker.config import WorkerConfig
    from worker.server import build_server

    config = WorkerConfig()
    serve_forever("worker", config, build_server, lambda srv: config.address(srv.port))


if __name__ == "__main__":
    main()

"""Load-test harness: closed and open loops against Fovea's gateway and workers, or any Open
Inference Protocol server; a table, a JSON file and PNG plots (`fovea loadtest --help`)."""

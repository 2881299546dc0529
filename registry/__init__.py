"""The registry service: model versions, aliases, artifacts, API keys and worker health, in Redis."""

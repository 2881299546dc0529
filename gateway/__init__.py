"""The gateway: the cluster's only public door (image API and Open Inference Protocol).

auth.py       API keys verified at the registry, cached, dropped by the key watch; roles, model patterns
ratelimit.py  per-key requests/s and images/s token buckets, shared by replicas through Redis
routing.py    alias/canary resolution; power of two choices over workers; ejection and health probes
service.py    admit, resolve, forward with the caller's deadline, retry UNAVAILABLE once elsewhere
servicer.py   the two public faces (fovea.v1.ImageService, inference.GRPCInferenceService)
metrics.py    Prometheus metrics and the batched access log
server.py     build_server(): handlers wrapped once, health, reflection, TLS/mTLS, metrics endpoint
"""

"""The gateway: the cluster's only public door (image API and Open Inference Protocol)."""

"""The worker service: ONNX Runtime behind the Open Inference Protocol, with dynamic batching."""

"""The gateway's HTTP/REST port: the Open Inference Protocol's REST binding and an image endpoint for curl."""

"""The node daemon that runs on each edge device: the stages of a bundle on ONNX Runtime, their KV
caches, the tick executor (also used by single-process decoding), the gRPC service and registration.

Layer rule: imports runtime.wire and runtime.core only; never torch, the coordinator or the client.
"""

"""The coordinator process: the gRPC service clients call, the engine that drives the SPEED scheduler
over remote nodes (admission, placement, failover), the link to each node, client tokens and metrics.

Layer rule: imports runtime.wire and runtime.core only; never ONNX Runtime, torch or the node code, so
a coordinator loads no model runtime.
"""

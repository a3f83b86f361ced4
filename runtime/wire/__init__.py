"""What travels between processes (proto/speed/v1/speed.proto): generated stubs, conversions between
messages and runtime.core's types, tensor packing, channel options, TLS identities and the metrics
endpoint.

Layer rule: imports runtime.core only; gRPC and protobuf, never ONNX Runtime or torch.
"""

"""Decoding in one process, without a cluster: plain decoding (the text every mode must reproduce),
the SPEED core on the local tick executor, and the choice of backend (ONNX Runtime or torch).

Layer rule: may import runtime.models (the torch backend, loaded only when asked for), nodes,
runtime.wire and runtime.core; never the coordinator or the client.
"""

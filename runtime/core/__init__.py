"""The vocabulary every process shares: the SPEED scheduler (the pure core of the method), sampling,
stopping, generation options and results, request limits, node states, placement, and the model,
bundle and cluster configurations.

Layer rule: imports nothing else of the project; no network, no gRPC, no ONNX Runtime, no torch; the
only I/O is reading the files a configuration or bundle consists of (and writing one atomically).
"""

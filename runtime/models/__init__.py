"""Model tools, the only torch code: the weight-shared decoder, training, ONNX export, GGUF import,
exit-adapter training, the model registry and the torch backend used to check the ONNX graphs.

Layer rule: may import nodes (the stage-model protocol and KV cache), runtime.wire and runtime.core;
nothing that serves requests imports it (only `speed reference --backend torch`, lazily).
"""

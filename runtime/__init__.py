"""SPEED runtime: speculative pipelined execution of weight-shared decoders.

Layers, top to bottom; a layer imports only the layers below it (tests/test_layers.py checks it):

    runtime.cli          the `speed` command, one module per command family
    runtime.bench        benchmarks: one process, a local cluster, load and chaos
    deploy               operating a cluster: `speed up`/`down`, certificates (and the example YAML files)
    runtime.coordinator  the coordinator process      | runtime.client  the SDK | runtime.local  one process
    runtime.models       model tools on torch: training, export, GGUF import, exits, the gate
    | nodes              the node process: its gRPC service, ring worker, peer links, registration
    runtime.executor     a model's stages run: graphs on ONNX Runtime, KV caches, the tick executor
    runtime.wire         what travels between processes: protobuf, conversions, channel options, TLS
    runtime.core         the shared vocabulary, free of I/O but files: the SPEED scheduler, sampling, stopping,
                         generation options and results, request limits, model and cluster configs, bundles

A node process loads nodes, runtime.executor, runtime.wire and runtime.core; a coordinator runtime.coordinator, runtime.wire
and runtime.core; an application runtime.client, runtime.wire and runtime.core.
"""

__version__ = "0.1.0"

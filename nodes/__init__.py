"""The node daemon that runs on each edge device: the gRPC service, the ring worker, the links to its
peers and registration with the coordinator. Its stages run on runtime.executor.

Layer rule: imports runtime.executor, runtime.wire and runtime.core only; never torch, the coordinator or
the client.
"""

"""The client SDK: what an application needs to use a cluster, and nothing of the model.

    from runtime.client import Client
    with Client("127.0.0.1:50050") as client:
        stream = client.generate("ROMEO:", max_new_tokens=32)
        for chunk in stream:
            print(chunk.text, end="", flush=True)
        print(stream.result().stats)

Layer rule: imports only `runtime.core` and `runtime.wire` (gRPC and protobuf); never ONNX Runtime,
torch, a node or the coordinator, so an application installs and loads little.
"""

from runtime.client.client import AsyncClient, Client
from runtime.client.errors import Busy, ClientError, DeadlineExceeded, InvalidRequest, Unauthenticated, Unavailable
from runtime.client.streams import AsyncGenerationStream, Chunk, GenerationStream
from runtime.core.chat import ChatMessage
from runtime.core.generation import GenerationOptions, GenerationResult, SpeculationStats
from runtime.core.stopping import StopReason

__all__ = ["AsyncClient", "AsyncGenerationStream", "Busy", "ChatMessage", "Chunk", "Client", "ClientError",
           "DeadlineExceeded", "GenerationOptions", "GenerationResult", "GenerationStream", "InvalidRequest",
           "SpeculationStats", "StopReason", "Unauthenticated", "Unavailable"]

"""What a client asks of a cluster and what comes back, free of any protocol: the coordinator works in
these types, and its doors (the gRPC service, the OpenAI-compatible HTTP API) translate to and from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.core.chat import ChatMessage
from runtime.core.generation import GenerationOptions, GenerationResult
from runtime.core.text_enum import TextEnum


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str = ""  # the text to continue; empty when messages hold a conversation
    messages: tuple[ChatMessage, ...] = ()
    options: GenerationOptions = field(default_factory=GenerationOptions)
    received_tokens: tuple[int, ...] = ()  # a resumed request: every token the client already has
    received_chars: int = 0  # and the characters of text it has (text held back for stop strings is not)


@dataclass(frozen=True)
class TextChunk:
    """Tokens a request committed and the text they add (held back while a stop string could still cut it)."""

    token_ids: tuple[int, ...]
    text: str


RequestEvent = TextChunk | GenerationResult  # a request yields chunks, then one result


class FailureKind(TextEnum):
    INVALID = "invalid"  # the request cannot be served as asked; the message says what to change
    OVERLOADED = "overloaded"  # every sequence slot is busy and the queue is full: retry later
    UNAVAILABLE = "unavailable"  # no serving node can run a stage, or one was lost on the way
    DEADLINE = "deadline"  # the caller's deadline passed first
    INTERNAL = "internal"  # a node refused a step: a fault of the runtime, not of the request


class RequestFailed(Exception):
    """A request that cannot be served or finished, with a sentence for the person who sent it."""

    def __init__(self, kind: FailureKind, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message

"""A client's request as the coordinator keeps it, from admission to its last event."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from runtime.core.generation import GenerationOptions
from runtime.core.stopping import StopStrings
from runtime.core.text_stream import TextStream


@dataclass
class Request:
    prompt_ids: list[int]
    options: GenerationOptions
    speculative: bool  # the options' choice, or the cluster's where they leave it open
    guess_thresholds: tuple[float, ...]  # the confidence gate per early stage: the options', cluster's or bundle's
    stop: StopStrings
    text: TextStream
    window: int = 0  # the ring data path: positions stage 0 runs ahead (the request's, else the cluster's)
    received: list[int] = field(default_factory=list)  # tokens the client already has (a resumed request)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # TextChunk..., then the result or RequestFailed
    cancelled: bool = False  # the client went away, or its deadline passed
    admitted: bool = False
    alone: bool = True  # no other request decoded beside it and the placement stayed, so far
    sent_tokens: int = 0
    admitted_at: float = 0.0
    first_token_at: float | None = None
    last_token_at: float = 0.0

"""Generation requests and results on the wire: GenerationRequest, GenerationOptions, SpeculationStats,
GenerationResult and a request's events to and from their protobuf messages, in one place for the client
and the coordinator."""

from __future__ import annotations

from collections.abc import Sequence

from runtime.core.chat import ChatMessage
from runtime.core.generation import DEFAULT_MAX_NEW_TOKENS, GenerationOptions, GenerationResult, SpeculationStats
from runtime.core.request import GenerationRequest, RequestEvent, TextChunk
from runtime.core.stopping import StopReason
from runtime.wire import speed_pb2 as pb
from runtime.wire.enums import from_wire, to_wire
from runtime.wire.sampling import top_p_of


def request_to_wire(prompt: str, options: GenerationOptions, messages: Sequence[ChatMessage] = ()) -> pb.GenerateRequest:
    """messages: a conversation instead of the prompt (then prompt is "")."""
    request = pb.GenerateRequest(
        prompt=prompt, messages=[pb.ChatMessage(role=m.role, content=m.content) for m in messages],
        max_new_tokens=options.max_new_tokens, stop=list(options.stop), ignore_eos=options.ignore_eos,
        chat=options.chat, plain_guesses=options.plain_guesses,
        sampling=pb.Sampling(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                             seed=options.seed))
    if options.speculative is not None:
        request.speculative = options.speculative
    if options.guess_threshold is not None:
        request.guess_threshold = options.guess_threshold
    if options.window is not None:
        request.window = options.window
    return request


def options_from_wire(request: pb.GenerateRequest) -> GenerationOptions:
    """Unset fields take their defaults: max_new_tokens 0 means the default, top_p 0 means 1."""
    sampling = request.sampling
    return GenerationOptions(
        max_new_tokens=request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, temperature=sampling.temperature,
        top_k=sampling.top_k, top_p=top_p_of(sampling), seed=sampling.seed, stop=tuple(request.stop),
        speculative=request.speculative if request.HasField("speculative") else None,
        ignore_eos=request.ignore_eos, chat=request.chat, plain_guesses=request.plain_guesses,
        guess_threshold=request.guess_threshold if request.HasField("guess_threshold") else None,
        window=request.window if request.HasField("window") else None)


def request_from_wire(request: pb.GenerateRequest) -> GenerationRequest:
    """Raises SpeedError with a sentence when an option is out of range."""
    return GenerationRequest(
        prompt=request.prompt, messages=tuple(ChatMessage(m.role, m.content) for m in request.messages),
        options=options_from_wire(request), received_tokens=tuple(request.continuation.token_ids),
        received_chars=request.continuation.text_chars)


def event_to_wire(event: RequestEvent) -> pb.GenerateEvent:
    if isinstance(event, TextChunk):
        return pb.GenerateEvent(tokens=pb.TokenChunk(token_ids=event.token_ids, text=event.text))
    return pb.GenerateEvent(finished=result_to_wire(event))


def result_to_wire(result: GenerationResult) -> pb.Finished:
    stats = result.stats
    return pb.Finished(
        stop_reason=to_wire(result.stop_reason, pb.StopReason), text=result.text, token_ids=result.token_ids,
        prompt_tokens=result.prompt_tokens, time_to_first_token_ms=result.time_to_first_token_ms,
        tokens_per_s=result.tokens_per_s, speculative=result.speculative, provider=result.provider,
        backend=result.backend,
        stats=pb.Stats(ticks=stats.ticks, committed=stats.committed, flips_per_boundary=stats.flips_per_boundary,
                       flushed_steps=stats.flushed_steps, mean_in_flight=stats.mean_in_flight,
                       held_guesses=stats.held_guesses))


def result_from_wire(finished: pb.Finished) -> GenerationResult:
    stats = finished.stats
    return GenerationResult(
        text=finished.text, token_ids=list(finished.token_ids),
        stop_reason=from_wire(finished.stop_reason, pb.StopReason, StopReason),
        prompt_tokens=finished.prompt_tokens, time_to_first_token_ms=finished.time_to_first_token_ms,
        tokens_per_s=finished.tokens_per_s, speculative=finished.speculative, backend=finished.backend,
        provider=finished.provider,
        stats=SpeculationStats(ticks=stats.ticks, committed=stats.committed,
                               flips_per_boundary=tuple(stats.flips_per_boundary), flushed_steps=stats.flushed_steps,
                               mean_in_flight=stats.mean_in_flight, held_guesses=stats.held_guesses))

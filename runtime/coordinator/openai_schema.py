"""What the OpenAI-compatible HTTP API takes: its request bodies as strict, bounded types, and its errors in
OpenAI's shape, {"error": {"message", "type", "param", "code"}}.

Nothing is coerced (true, "1" and 1.5 are not integers; a JSON integer is a number), no number may overflow
the int32 fields it travels in, and no text may hold a lone surrogate (it cannot be UTF-8). A body that breaks
a rule gets one sentence naming the field and what it takes. Unknown fields are ignored: clients send many.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from runtime.core.chat import ChatMessage
from runtime.core.generation import MAX_WINDOW, GenerationOptions
from runtime.core.limits import MAX_NEW_TOKENS, MAX_TEMPERATURE, MAX_TOP_K

SEED_MAX = 2**63 - 1
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
              405: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPE.get(self.status, "server_error"),
                          "param": self.param, "code": None}}


def _utf8(text: str) -> str:
    text.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError, a ValueError: the field's sentence follows
    return text


Text = Annotated[str, AfterValidator(_utf8)]
STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

TEXT = "UTF-8 text (no lone surrogates)"
TOKENS = f"an integer from 1 to {MAX_NEW_TOKENS}, or null"
UNSUPPORTED = "a number (only 0 is supported)"
ACCEPTED = {  # what each field takes, for the sentence that refuses a body
    "model": f"{TEXT} naming the model /v1/models lists, or null",
    "prompt": f"{TEXT}, or a list of one such text",
    "messages": "a list of messages, each an object with a role and a content",
    "role": f"{TEXT}: system, user or assistant",
    "content": f"{TEXT}, a list of text parts, or null",
    "type": f'{TEXT}: "text"',
    "text": TEXT,
    "max_tokens": TOKENS,
    "max_completion_tokens": TOKENS,
    "temperature": f"a number from 0 (greedy) to {MAX_TEMPERATURE:g}",
    "top_p": "a number above 0 and at most 1",
    "top_k": f"an integer from 0 (all tokens) to {MAX_TOP_K}",
    "n": "the integer 1",
    "seed": f"an integer from 0 to {SEED_MAX}, or null",
    "stop": f"{TEXT}, a list of such texts, or null",
    "stream": "true or false",
    "stream_options": 'an object such as {"include_usage": true}, or null',
    "include_usage": "true or false",
    "presence_penalty": UNSUPPORTED,
    "frequency_penalty": UNSUPPORTED,
    "logit_bias": "an object, or null (only an empty one is supported)",
    "speculative": "true, false or null (the cluster's setting)",
    "guess_threshold": "a number from 0 to 1, or null (the cluster's setting)",
    "window": f"an integer from 0 to {MAX_WINDOW}, or null (the cluster's setting)",
    "logprobs": "null (log probabilities are not supported)",
    "echo": "false (echo is not supported)",
}


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints take: OpenAI's, then SPEED's own (which never change the text)."""

    model_config = STRICT

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, Any] | None = None
    top_k: int = Field(0, ge=0, le=MAX_TOP_K)
    speculative: bool | None = None
    guess_threshold: float | None = Field(None, ge=0, le=1)
    window: int | None = Field(None, ge=0, le=MAX_WINDOW)

    def check_supported(self) -> None:
        if self.n != 1:
            raise ApiError(400, f"n must be 1, got {self.n}: this server makes one choice per request", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported; leave it 0 (the text is exactly the model's)", param=name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported; leave it out", param="logit_bias")

    def options(self, max_tokens: int) -> tuple[GenerationOptions, int]:
        """The request's GenerationOptions and its seed (a fresh one when none is given, as OpenAI's API
        samples differently each time; the answer reports it so the text can be had again)."""
        seed = self.seed if self.seed is not None else secrets.randbelow(SEED_MAX)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationOptions(max_new_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
                                 top_p=self.top_p, seed=seed, stop=stop, speculative=self.speculative,
                                 guess_threshold=self.guess_threshold, window=self.window), seed


class CompletionRequest(Sampling):
    prompt: Text | list[Text]
    logprobs: int | None = None
    echo: bool = False


class ContentPart(BaseModel):
    model_config = STRICT

    type: Text
    text: Text = ""


class ChatTurn(BaseModel):
    model_config = STRICT

    role: Text
    content: Text | list[ContentPart] | None = None

    def message(self) -> ChatMessage:
        """Content given as parts ([{"type": "text", "text": ...}]) joins its text parts; others are refused."""
        if isinstance(self.content, list):
            kinds = {part.type for part in self.content} - {"text"}
            if kinds:
                raise ApiError(400, f"message content parts of type {', '.join(sorted(kinds))} are not supported; "
                                    "send text", param="messages")
            return ChatMessage(self.role, "".join(part.text for part in self.content))
        return ChatMessage(self.role, self.content or "")


class ChatRequest(Sampling):
    messages: list[ChatTurn]
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool | None = None


def invalid_body(errors: list[dict]) -> ApiError:
    """A 400 with one sentence for pydantic's errors of a body: the field of the deepest error (of a union's
    alternatives, the one that came closest to fitting) and what that field takes."""
    if errors[0]["type"] == "json_invalid":
        return ApiError(400, "the request body is not valid JSON; send a JSON object of the request's fields")
    error = max(errors, key=lambda e: len(_field_path(e["loc"])))
    path = _field_path(error["loc"])
    while path and isinstance(path[-1], int):  # an element's error is its list's: say what the list takes
        path.pop()
    if not path:
        return ApiError(400, "the request body must be a JSON object of the request's fields")
    param = ".".join(map(str, path))
    verb = "is required and must be" if error["type"] == "missing" else "must be"
    return ApiError(400, f"{param} {verb} {ACCEPTED[path[-1]]}", param=param)


def _field_path(loc: tuple) -> list[str | int]:
    """A location without "body" and pydantic's names for a union's alternatives: fields and list indices."""
    return [part for part in loc if isinstance(part, int) or part in ACCEPTED]

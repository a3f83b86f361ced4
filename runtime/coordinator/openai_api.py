"""The OpenAI-compatible HTTP API of the coordinator: POST /v1/completions, POST /v1/chat/completions (as
server-sent events with "stream": true), GET /v1/models and its schema at GET /openapi.json, served by FastAPI
in the coordinator's own event loop (the bodies it takes: openai_schema.py; its connections: http_protocol.py).

A request becomes the same GenerateRequest the gRPC service takes, so it is checked by the same rules,
admitted by the same engine and counted in the same metrics; the text is the text `speed generate`
gives. Extra fields carry SPEED's own options (speculative, guess_threshold, window, top_k) and every
answer carries SPEED's statistics under "speed". Errors take OpenAI's shape, {"error": {"message",
"type", "param", "code"}}: 400 for a bad parameter, 401 without a valid token, 429 when the queue is
full, 503 when the cluster cannot serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator

import uvicorn
from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from runtime.coordinator.coordinator import Coordinator
from runtime.coordinator.http_protocol import HeaderDeadlineProtocol
from runtime.coordinator.openai_schema import ApiError, ChatRequest, CompletionRequest, Sampling, invalid_body
from runtime.coordinator.requests import Request
from runtime.core.chat import ChatMessage
from runtime.core.cluster_file import parse_address
from runtime.core.errors import SpeedError
from runtime.core.generation import GenerationResult
from runtime.core.request import FailureKind, GenerationRequest, RequestEvent, RequestFailed, TextChunk
from runtime.core.stopping import StopReason

STOP_GRACE_S = 2.0  # answers in progress may finish within this when the coordinator stops
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; a chat answer may fill the context
FINISH_REASON = {StopReason.EOS: "stop", StopReason.STOP: "stop", StopReason.LENGTH: "length",
                 StopReason.CONTEXT: "length"}
HTTP_STATUS = {FailureKind.INVALID: 400, FailureKind.OVERLOADED: 429, FailureKind.UNAVAILABLE: 503,
               FailureKind.DEADLINE: 504, FailureKind.INTERNAL: 500}


class Answer:
    """One request's answer in OpenAI's shapes: the whole body, or the chunks of a stream."""

    def __init__(self, model: str, *, chat: bool, seed: int):
        self.model, self.chat, self.seed = model, chat, seed
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, finished: GenerationResult) -> dict:
        text, reason = finished.text, FINISH_REASON[finished.stop_reason]
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                   "logprobs": None} if self.chat else
                  {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
        return {**self._envelope("chat.completion" if self.chat else "text_completion", [choice]),
                "usage": self.usage(finished), "speed": self.statistics(finished)}

    def chunk(self, text: str = "", *, finish_reason: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope("text_completion", [{"index": 0, "text": text, "finish_reason": finish_reason,
                                                   "logprobs": None}])

    def last(self, finished: GenerationResult, *, include_usage: bool) -> list[dict]:
        """The chunk that ends the choice (with SPEED's statistics), then the usage chunk when asked for."""
        closing = {**self.chunk(finish_reason=FINISH_REASON[finished.stop_reason]), "speed": self.statistics(finished)}
        if not include_usage:
            return [closing]
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return [closing, {**self._envelope(kind, []), "usage": self.usage(finished)}]

    @staticmethod
    def usage(finished: GenerationResult) -> dict:
        generated = len(finished.token_ids)
        return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": generated,
                "total_tokens": finished.prompt_tokens + generated}

    def statistics(self, finished: GenerationResult) -> dict:
        statistics = finished.to_json()
        del statistics["text"]
        return {**statistics, "seed": self.seed}


def openai_app(coordinator: Coordinator) -> FastAPI:
    def authorize(http_request: HttpRequest) -> None:
        if coordinator.tokens is not None and not coordinator.bearer_known(http_request.headers.get("authorization", "")):
            raise ApiError(401, f"cluster {coordinator.spec.name} needs a valid bearer token (Authorization: Bearer "
                                "TOKEN); ask its operator for one (speed tokens add NAME)")

    # Every endpoint, the schema too, needs the token, checked before a body's fields: a client without one
    # learns nothing of the API, not even which field is wrong.
    app = FastAPI(title=f"SPEED cluster {coordinator.spec.name}", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(authorize)])
    model_name = coordinator.bundle.manifest["name"]

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError) -> JSONResponse:
        return _response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError) -> JSONResponse:
        return _response(invalid_body(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(http_request: HttpRequest, exc: HTTPException) -> JSONResponse:
        return _response(ApiError(exc.status_code, _sentence(exc, http_request)))

    def check_model(body: Sampling) -> None:
        if body.model and body.model != model_name:
            raise ApiError(404, f"model {body.model!r} is not served here; this cluster serves {model_name!r}",
                           param="model")

    def prepare(body: Sampling, *, prompt: str = "", messages: tuple[ChatMessage, ...] = (),
                max_tokens: int) -> tuple[Request, Answer]:
        body.check_supported()
        options, seed = body.options(max_tokens)
        try:
            prepared = coordinator.prepare(GenerationRequest(prompt, messages, options))
        except RequestFailed as exc:
            raise _api_error(exc) from None
        return prepared, Answer(model_name, chat=bool(messages), seed=seed)

    async def answer(prepared: Request, reply: Answer, http_request: HttpRequest,
                     include_usage: bool, stream: bool) -> Response:
        events = coordinator.serve(prepared)
        if not stream:
            finished = await _until_disconnected(_finished(events), http_request)
            return JSONResponse(reply.whole(finished)) if finished else Response(status_code=499)
        try:
            first = await anext(events)  # an answer the cluster cannot start gets its status, not a broken stream
        except RequestFailed as exc:
            raise _api_error(exc) from None
        return StreamingResponse(_server_sent(reply, first, events, include_usage), media_type="text/event-stream")

    @app.get("/openapi.json", include_in_schema=False)
    async def schema() -> dict:
        return app.openapi()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": f"speed cluster {coordinator.spec.name}"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http_request: HttpRequest) -> Response:
        check_model(body)
        if body.logprobs is not None or body.echo:
            raise ApiError(400, "logprobs and echo are not supported; leave them out", param="logprobs")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, f"prompt must be one text, got a list of {len(prompts)}; send one request per prompt",
                           param="prompt")
        prepared, reply = prepare(body, prompt=prompts[0], max_tokens=body.max_tokens or COMPLETION_MAX_TOKENS)
        return await answer(prepared, reply, http_request, _include_usage(body), body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http_request: HttpRequest) -> Response:
        check_model(body)
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported; leave them out", param="logprobs")
        limit = body.max_completion_tokens or body.max_tokens or coordinator.bundle.config.context_length
        prepared, reply = prepare(body, messages=tuple(turn.message() for turn in body.messages), max_tokens=limit)
        return await answer(prepared, reply, http_request, _include_usage(body), body.stream)

    return app


def _response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _sentence(exc: HTTPException, http_request: HttpRequest) -> str:
    """What a request that reached no endpoint, or whose body could not be read, did wrong."""
    if exc.status_code == 404:
        return "no such endpoint; this server offers /v1/completions, /v1/chat/completions and /v1/models"
    if exc.status_code == 405:
        return f"{http_request.url.path} does not take {http_request.method}; send {exc.headers['Allow']}"
    if exc.status_code == 400:  # FastAPI could not parse the body: nested too deep, a number too long, not UTF-8
        return "the request body could not be read as JSON; send a JSON object of the request's fields"
    return str(exc.detail)


def _include_usage(body: Sampling) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _api_error(exc: RequestFailed) -> ApiError:
    return ApiError(HTTP_STATUS[exc.kind], exc.message)


async def _finished(events: AsyncIterator[RequestEvent]) -> GenerationResult:
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                if isinstance(event, GenerationResult):
                    return event
        except RequestFailed as exc:
            raise _api_error(exc) from None
    raise AssertionError("a request's events end with its result or RequestFailed")


async def _until_disconnected(answering, http_request: HttpRequest):
    """The answer, or None when the client goes away first (which cancels the request, freeing its caches)."""
    task = asyncio.ensure_future(answering)
    watch = asyncio.ensure_future(_disconnect(http_request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return task.result() if not task.cancelled() else None


async def _disconnect(http_request: HttpRequest) -> None:
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


async def _server_sent(reply: Answer, first: RequestEvent, events: AsyncIterator[RequestEvent],
                       include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, the closing chunk, [DONE]; a failure after the stream
    began is an error event, as OpenAI sends one."""
    if reply.chat:
        yield _event(reply.chunk(first=True))  # the assistant's role comes first, as OpenAI streams it
    async with contextlib.aclosing(events):
        event = first
        try:
            while True:
                if not isinstance(event, TextChunk):
                    for chunk in reply.last(event, include_usage=include_usage):
                        yield _event(chunk)
                    break
                if event.text:
                    yield _event(reply.chunk(event.text))
                event = await anext(events)
        except RequestFailed as exc:
            yield _event(_api_error(exc).body())
    yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside the coordinator's event loop, which has signal handlers of its own to stop it."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def http_server(coordinator: Coordinator) -> tuple[EmbeddedServer, socket.socket]:
    """The API's server and its listening socket, bound now so that a taken port is a sentence, not a crash
    inside uvicorn. A secure cluster's API speaks TLS with the coordinator's certificate and, where clients
    prove themselves with certificates, asks for one of the cluster's authority."""
    address = coordinator.spec.coordinator.http_address
    host, port = parse_address(address)
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise SpeedError(f"the OpenAI-compatible API cannot listen on {address} ({exc.strerror}); stop what holds "
                         "the port or change coordinator.http_address in the cluster file") from None
    tls = {}
    security = coordinator.spec.security
    if security is not None:
        tls = {"ssl_certfile": security.certs / "coordinator.pem", "ssl_keyfile": security.certs / "coordinator.key",
               "ssl_ca_certs": security.certs / "ca.pem",
               "ssl_cert_reqs": ssl.CERT_REQUIRED if coordinator.tokens is None else ssl.CERT_NONE}
    config = uvicorn.Config(openai_app(coordinator), http=HeaderDeadlineProtocol, log_config=None, access_log=False,
                            lifespan="off", timeout_graceful_shutdown=STOP_GRACE_S, **tls)
    return EmbeddedServer(config), listener

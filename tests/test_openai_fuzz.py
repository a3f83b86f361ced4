"""Fuzzing the OpenAI-compatible HTTP API of a real cluster, as tests/test_fuzz.py fuzzes the gRPC one: JSON of
every type (huge and negative integers, 1e308, NaN, texts with lone surrogates, lists, objects) in every field
of /v1/completions and /v1/chat/completions, streamed or not, and bodies that are no JSON object at all.
Every answer is a 200 or a 4xx in OpenAI's error shape, never a 5xx, and the coordinator gives the reference
text afterwards. SPEED_FUZZ_EXAMPLES sets how many examples run (tests/support.py)."""

from __future__ import annotations

import http.client
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.core.limits import MAX_NEW_TOKENS, MAX_TOP_K
from tests.conftest import CLUSTER_PROMPTS
from tests.support import FUZZ

pytestmark = pytest.mark.cluster  # its tests start real processes on loopback

REQUEST_TIMEOUT_S = 3.0  # a request may decode to the end of the context: it may run out of time, then is dropped
SHARED_FIELDS = ["model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options",
                 "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "speculative", "guess_threshold",
                 "window", "logprobs", "user"]
FIELDS = {"/v1/completions": ["prompt", "echo", *SHARED_FIELDS],
          "/v1/chat/completions": ["messages", "max_completion_tokens", *SHARED_FIELDS]}
ERROR_STATUSES = range(400, 500)

integers = st.one_of(st.sampled_from([0, 1, -1, 64, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63) - 1,
                                      10**40, MAX_NEW_TOKENS, MAX_TOP_K + 1]), st.integers())
floats = st.one_of(st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, 100.5, 1e308, -1e308, 5e-324, math.inf, math.nan]),
                   st.floats())
surrogates = st.builds(lambda before, lone, after: before + lone + after, st.text(max_size=4),
                       st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"]), st.text(max_size=4))
texts = st.one_of(st.sampled_from(["", "ROMEO.", "user", "assistant", "system", "text", "image_url", "\n", "\x00",
                                   "demo-4x3", "1", "0.5", "true"]), st.text(max_size=12), surrogates)
json_values = st.recursive(st.one_of(st.none(), st.booleans(), integers, floats, texts),
                           lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
                           max_leaves=8)


@st.composite
def turns(draw) -> dict:
    """A chat message, maybe with any value as its role or content, or its content as parts."""
    turn = {"role": draw(st.sampled_from(["user", "system"])), "content": draw(st.sampled_from(CLUSTER_PROMPTS))}
    if draw(st.booleans()):
        turn[draw(st.sampled_from(["role", "content"]))] = draw(json_values)
    if draw(st.booleans()):
        turn["content"] = draw(st.lists(st.fixed_dictionaries({"type": st.one_of(st.just("text"), json_values),
                                                                "text": st.one_of(texts, json_values)}), max_size=3))
    return turn


@st.composite
def requests(draw) -> tuple[str, bytes, bool]:
    """An endpoint, a body and whether it asks for a stream: a valid request of few tokens with up to three fields
    replaced, or no JSON object."""
    path = draw(st.sampled_from(list(FIELDS)))
    body: object = {"max_tokens": draw(st.integers(1, 4)), "stream": draw(st.booleans()), "temperature": 0}
    if path == "/v1/completions":
        body["prompt"] = draw(st.sampled_from(CLUSTER_PROMPTS))
    else:
        body["messages"] = draw(st.lists(turns(), min_size=1, max_size=3))
    for name in draw(st.lists(st.sampled_from(FIELDS[path]), max_size=3, unique=True)):
        body[name] = draw(json_values)
    if draw(st.integers(0, 19)) == 0:
        body = draw(json_values)
    raw = json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as \ud800, as JSON allows
    if draw(st.integers(0, 29)) == 0:
        raw = draw(st.sampled_from([b"", b"{", b'{"prompt": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000,
                                    b'{"max_tokens": 1' + b"0" * 5000 + b"}"]))
    return path, raw, isinstance(body, dict) and body.get("stream") is True


def send(address: tuple[str, int], path: str, raw: bytes) -> tuple[int, bytes] | None:
    """The status and body of one request on a connection of its own; None when it runs out of time (closing
    the connection cancels the request)."""
    connection = http.client.HTTPConnection(*address, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    except TimeoutError:
        return None
    finally:
        connection.close()


def assert_openai_error(payload: dict) -> None:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, payload
    assert isinstance(error["message"], str) and error["message"].strip() and "\n" not in error["message"], payload
    assert isinstance(error["type"], str) and (error["param"] is None or isinstance(error["param"], str)), payload


def assert_answer(status: int, body: bytes, streamed: bool) -> None:
    """A 200 in OpenAI's shape (or a stream of events that ends with [DONE]), else a 4xx in its error shape."""
    assert status == 200 or status in ERROR_STATUSES, (status, body[:300])
    if status != 200:
        assert_openai_error(json.loads(body))
    elif streamed:
        events = [event for event in body.split(b"\n\n") if event]
        assert events[-1] == b"data: [DONE]", body[-300:]
        for event in (json.loads(event.removeprefix(b"data: ")) for event in events[:-1]):
            if "error" in event:  # a failure after the stream began
                assert_openai_error(event)
            else:
                assert event["choices"] or "usage" in event, event
    else:
        assert json.loads(body)["choices"][0]["finish_reason"] in ("stop", "length"), body[:300]


def test_fuzzed_http_requests_get_a_200_or_a_4xx_in_openai_s_shape_and_harm_no_process(serving_cluster, reference):
    host, port = serving_cluster.spec.coordinator.http_address.rsplit(":", 1)
    address = (host, int(port))
    outcomes = {"answered": 0, "refused": 0, "out of time": 0}

    @FUZZ
    @given(requests())
    def fuzz(request: tuple[str, bytes, bool]) -> None:
        path, raw, streamed = request
        answer = send(address, path, raw)
        if answer is None:
            outcomes["out of time"] += 1
        else:
            status, body = answer
            outcomes["answered" if status == 200 else "refused"] += 1
            assert_answer(status, body, streamed)
        assert all(process.poll() is None for process in serving_cluster.processes.values())

    fuzz()
    assert outcomes["answered"] and outcomes["refused"], outcomes
    status, body = send(address, "/v1/completions",
                        json.dumps({"prompt": CLUSTER_PROMPTS[0], "max_tokens": 8, "temperature": 0}).encode())
    assert status == 200 and json.loads(body)["speed"]["token_ids"] == reference(CLUSTER_PROMPTS[0], max_new_tokens=8)

"""The OpenAI-compatible HTTP API of a real cluster (a coordinator and three node processes on loopback),
driven by the official `openai` package: greedy answers are the text `speed reference` gives, whole or
streamed, completion or chat; errors come in OpenAI's shape with the right status."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from runtime.core.chat import ChatMessage
from runtime.core.generation import GenerationOptions
from runtime.core.limits import MAX_NEW_TOKENS, MAX_TOP_K
from runtime.local.reference import LocalDecoder
from tests.conftest import CLUSTER_PROMPTS, assert_one_line_error, free_port, run_speed, write_cluster

pytestmark = pytest.mark.cluster  # its tests start real processes on loopback

NEW_TOKENS = 24
CONVERSATION = [ChatMessage("system", "A scene in Verona."), ChatMessage("user", "Who art thou?"),
                ChatMessage("assistant", "A gentleman of Padua."), ChatMessage("user", "And whence comest thou?")]


@pytest.fixture(scope="module")
def local() -> LocalDecoder:
    return LocalDecoder()


@pytest.fixture(scope="module")
def api(serving_cluster) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{serving_cluster.http_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def as_dicts(messages: list[ChatMessage]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def test_models_lists_the_bundle(api, local):
    assert [model.id for model in api.models.list()] == [local.bundle.manifest["name"]]


@pytest.mark.parametrize("prompt", CLUSTER_PROMPTS[:2])
def test_a_greedy_completion_is_the_reference_text_whole_and_streamed(api, local, prompt):
    expected = local.generate(prompt, GenerationOptions(max_new_tokens=NEW_TOKENS))
    whole = api.completions.create(model=local.bundle.manifest["name"], prompt=prompt, max_tokens=NEW_TOKENS,
                                   temperature=0)
    assert whole.choices[0].text == expected.text
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (expected.prompt_tokens, NEW_TOKENS)
    assert whole.model_extra["speed"]["token_ids"] == expected.token_ids

    stream = api.completions.create(prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, stream=True,
                                    model="", extra_body={"speculative": False})
    pieces = [chunk.choices[0] for chunk in stream]
    assert "".join(piece.text for piece in pieces) == expected.text
    assert pieces[-1].finish_reason == "length" and len(pieces) > 2


def test_a_multi_turn_chat_is_the_reference_text_whole_and_streamed(api, local):
    expected = local.generate("", GenerationOptions(max_new_tokens=NEW_TOKENS), messages=CONVERSATION)
    whole = api.chat.completions.create(model=local.bundle.manifest["name"], messages=as_dicts(CONVERSATION),
                                        max_tokens=NEW_TOKENS, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected.text
    assert whole.usage.completion_tokens == len(expected.token_ids)

    stream = api.chat.completions.create(model=local.bundle.manifest["name"], messages=as_dicts(CONVERSATION),
                                         max_completion_tokens=NEW_TOKENS, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.total_tokens == expected.prompt_tokens + len(expected.token_ids)


def test_the_client_sdk_sends_a_conversation_too(serving_cluster, local):
    from runtime.client import Client

    expected = local.generate("", GenerationOptions(max_new_tokens=NEW_TOKENS), messages=CONVERSATION)
    with Client(serving_cluster.endpoint) as client:
        result = client.chat(as_dicts(CONVERSATION), max_new_tokens=NEW_TOKENS).result()
    assert (result.text, result.token_ids) == (expected.text, expected.token_ids)


def test_a_seeded_sample_is_the_reference_sample_and_an_unseeded_one_reports_its_seed(api, local):
    sampled = GenerationOptions(max_new_tokens=NEW_TOKENS, temperature=0.8, top_p=0.9, seed=11)
    expected = local.generate(CLUSTER_PROMPTS[2], sampled)
    answer = api.completions.create(model="", prompt=CLUSTER_PROMPTS[2], max_tokens=NEW_TOKENS, temperature=0.8,
                                    top_p=0.9, seed=11)
    assert answer.choices[0].text == expected.text

    unseeded = api.completions.create(model="", prompt=CLUSTER_PROMPTS[2], max_tokens=NEW_TOKENS, temperature=0.8)
    seed = unseeded.model_extra["speed"]["seed"]
    again = local.generate(CLUSTER_PROMPTS[2], GenerationOptions(max_new_tokens=NEW_TOKENS, temperature=0.8, seed=seed))
    assert unseeded.choices[0].text == again.text


def test_a_stop_string_ends_the_answer_and_is_left_out(api, local):
    expected = local.generate(CLUSTER_PROMPTS[0], GenerationOptions(max_new_tokens=NEW_TOKENS, stop=("\n",)))
    answer = api.completions.create(model="", prompt=CLUSTER_PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0,
                                    stop="\n")
    assert answer.choices[0].text == expected.text and "\n" not in expected.text
    assert answer.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("fields", "status", "fragment"), [
    ({"temperature": -1}, 400, "temperature"),
    ({"n": 2}, 400, "n must be 1"),
    ({"prompt": ""}, 400, "the prompt is empty"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty is not supported"),
    ({"stop": ["x"] * 17}, 400, "at most 16 stop strings"),
    ({"model": "gpt-4"}, 404, "is not served here"),
])
def test_a_bad_request_gets_openai_s_error_shape_with_a_sentence(serving_cluster, fields, status, fragment):
    body = {"prompt": "ROMEO.", "max_tokens": 4, **fields}
    code, answer = post(f"{serving_cluster.http_url}/v1/completions", body)
    assert code == status
    error = answer["error"]
    assert fragment in error["message"] and error["type"] in ("invalid_request_error", "not_found_error")


@pytest.mark.parametrize(("endpoint", "fields", "param", "accepted"), [
    ("completions", {"max_tokens": 2**32}, "max_tokens", f"an integer from 1 to {MAX_NEW_TOKENS}"),
    ("completions", {"max_tokens": True}, "max_tokens", "an integer from 1"),
    ("completions", {"max_tokens": "1"}, "max_tokens", "an integer from 1"),
    ("completions", {"max_tokens": 1.5}, "max_tokens", "an integer from 1"),
    ("completions", {"top_k": 2**31}, "top_k", f"an integer from 0 (all tokens) to {MAX_TOP_K}"),
    ("completions", {"top_k": 2**31, "stream": True}, "top_k", f"to {MAX_TOP_K}"),
    ("completions", {"speculative": "yes"}, "speculative", "true, false or null"),
    ("completions", {"stream": 1}, "stream", "true or false"),
    ("completions", {"temperature": "0.5"}, "temperature", "a number from 0"),
    ("completions", {"window": "1"}, "window", "an integer from 0"),
    ("completions", {"prompt": "ROMEO.\ud800"}, "prompt", "UTF-8 text"),
    ("completions", {"stop": "\ud800"}, "stop", "UTF-8 text"),
    ("completions", {"stop": ["\n", "\udfff"]}, "stop", "UTF-8 text"),
    ("chat/completions", {"max_completion_tokens": 2**32}, "max_completion_tokens", f"to {MAX_NEW_TOKENS}"),
    ("chat/completions", {"messages": [{"role": "user", "content": "Who art thou?\ud800"}]}, "messages.0.content",
     "UTF-8 text"),
    ("chat/completions", {"messages": [{"role": "\ud800", "content": "Who art thou?"}]}, "messages.0.role",
     "UTF-8 text"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages.0.content.0.text", "UTF-8 text"),
])
def test_a_value_out_of_range_or_of_the_wrong_type_is_a_400_naming_the_field(serving_cluster, endpoint, fields, param,
                                                                             accepted):
    """Never a 500: numbers that would overflow the wire's int32 fields, strings that cannot be UTF-8 (a lone
    surrogate) and values of the wrong type (no coercion of true, "1" or 1.5 to an integer) are refused at the door."""
    body = {"prompt": "ROMEO.", "messages": [{"role": "user", "content": "Who art thou?"}], "max_tokens": 4, **fields}
    code, answer = post(f"{serving_cluster.http_url}/v1/{endpoint}", body)
    assert code == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"].startswith(f"{param} must be ") and accepted in error["message"], error["message"]
    assert "\n" not in error["message"]
    code, answer = post(f"{serving_cluster.http_url}/v1/completions", {"prompt": "ROMEO.", "max_tokens": 2})
    assert code == 200 and answer["usage"]["completion_tokens"] == 2  # the coordinator serves on


def test_a_float_field_takes_a_json_integer(serving_cluster):
    body = {"prompt": "ROMEO.", "max_tokens": 2, "temperature": 0, "top_p": 1, "guess_threshold": 1}
    code, answer = post(f"{serving_cluster.http_url}/v1/completions", body)
    assert code == 200, answer


def test_a_chat_the_template_cannot_take_is_refused_with_a_sentence(serving_cluster):
    code, answer = post(f"{serving_cluster.http_url}/v1/chat/completions",
                        {"messages": [{"role": "narrator", "content": "Exeunt."}]})
    assert code == 400 and "a role is one of system, user, assistant" in answer["error"]["message"]
    code, answer = post(f"{serving_cluster.http_url}/v1/chat/completions", {"messages": "hello"})
    assert code == 400 and answer["error"]["param"] == "messages"


def test_a_body_that_is_not_json_an_unknown_path_and_a_wrong_method_get_a_sentence(serving_cluster):
    request = urllib.request.Request(f"{serving_cluster.http_url}/v1/completions", data=b"not json",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400 and "not valid JSON" in json.load(refused.value)["error"]["message"]
    code, answer = get(f"{serving_cluster.http_url}/v1/engines")
    assert code == 404 and "/v1/chat/completions" in answer["error"]["message"]
    code, answer = get(f"{serving_cluster.http_url}/v1/completions")
    assert code == 405 and answer["error"]["message"] == "/v1/completions does not take GET; send POST"


def test_a_cluster_that_cannot_serve_answers_503(tmp_path, state_dir):
    """Only the coordinator runs (no node ever came): the API answers, and says why it cannot serve."""
    import subprocess
    import sys
    import time

    http = f"127.0.0.1:{free_port()}"
    path = write_cluster(tmp_path, extra_coordinator_keys=f"  http_address: {http}\n")
    coordinator = subprocess.Popen([sys.executable, "-m", "runtime.cli", "coordinator", "--cluster", str(path)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                code, answer = post(f"http://{http}/v1/completions", {"prompt": "ROMEO.", "max_tokens": 4})
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "the HTTP API never came up"
                time.sleep(0.2)
        assert code == 503 and answer["error"]["type"] == "service_unavailable"
        assert "edge-1" in answer["error"]["message"]
    finally:
        coordinator.terminate()
        coordinator.wait(timeout=30)


def test_a_taken_http_port_stops_the_coordinator_with_a_sentence(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        path = write_cluster(tmp_path, extra_coordinator_keys=f"  http_address: {address}\n")
        assert_one_line_error(run_speed("coordinator", "--cluster", str(path), timeout=60),
                              f"cannot listen on {address}", "http_address")


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return _answer(request)


def get(url: str) -> tuple[int, dict]:
    return _answer(urllib.request.Request(url))


def _answer(request: urllib.request.Request) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)

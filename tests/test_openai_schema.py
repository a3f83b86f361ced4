"""The bodies the HTTP API takes, without a server: every field says what it takes, and a refusal names the
field that is wrong, the deepest of a union's alternatives."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from runtime.coordinator.openai_schema import (
    ACCEPTED,
    ChatRequest,
    ChatTurn,
    CompletionRequest,
    ContentPart,
    StreamOptions,
    invalid_body,
)


@pytest.mark.parametrize("model", [CompletionRequest, ChatRequest, ChatTurn, ContentPart, StreamOptions])
def test_every_field_says_what_it_takes(model: type[BaseModel]):
    assert set(model.model_fields) <= set(ACCEPTED)


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}, "messages.0.content.0.text"),
    ({"messages": [{"content": "Who art thou?"}]}, "messages.0.role"),
    ({"messages": [7]}, "messages"),
    ({"messages": [], "stop": ["\n", 5]}, "stop"),
    ({"messages": [], "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"messages": [], "temperature": float("nan")}, "temperature"),
    ({"messages": [], "seed": -1}, "seed"),
    ([], None),
])
def test_a_refusal_names_the_field_and_what_it_takes(body, param):
    with pytest.raises(ValidationError) as refused:
        ChatRequest.model_validate(body)
    error = invalid_body(refused.value.errors())
    assert (error.status, error.param) == (400, param)
    if param is None:
        assert error.message == "the request body must be a JSON object of the request's fields"
    else:
        assert error.message.startswith(f"{param} ") and ACCEPTED[param.split(".")[-1]] in error.message

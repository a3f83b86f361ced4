"""`speed chat` driven through a pseudo-terminal, in this process (--bundle) and on a real cluster: each
answer is the text of decoding the whole conversation so far, /reset starts over, Ctrl-C stops an answer
and the chat goes on, /exit leaves with status 0."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from runtime.client import Client
from runtime.core.chat import ChatMessage
from runtime.core.generation import GenerationOptions
from runtime.local.reference import LocalDecoder
from tests.conftest import assert_one_line_error, run_speed
from tests.terminal import Terminal

pytestmark = pytest.mark.cluster  # its tests start real processes on loopback

NEW_TOKENS = 20
PROMPT = "\n> "  # the prompt after an answer (or the help line)
FIRST, SECOND = "Who art thou?", "And whence comest thou?"


@pytest.fixture(scope="module")
def local() -> LocalDecoder:
    return LocalDecoder()  # the shipped demo model, whose template makes a conversation a scene of a play


def answer_of(local: LocalDecoder, *turns: str) -> str:
    """The answer to the last of `turns`, each earlier one answered as the model answers it."""
    conversation: list[ChatMessage] = []
    for turn in turns:
        conversation.append(ChatMessage("user", turn))
        text = local.generate("", GenerationOptions(max_new_tokens=NEW_TOKENS), messages=conversation).text
        conversation.append(ChatMessage("assistant", text))
    return text


def say(terminal: Terminal, line: str) -> str:
    """Type a line; what the chat answers (without the echoed line and the next prompt)."""
    terminal.type(line + "\n")
    shown = terminal.read_until(lambda out: out.endswith(PROMPT) and out.count("\n") >= 2)
    assert shown.startswith(line + "\n"), shown
    return shown[len(line) + 1 : -len(PROMPT)]


def test_a_conversation_in_this_process_remembers_its_turns_and_starts_over(local):
    with Terminal("chat", "--bundle", str(local.bundle.path), "--max-new-tokens", str(NEW_TOKENS)) as terminal:
        assert "/reset" in terminal.read_until(lambda out: out.endswith(PROMPT))
        assert say(terminal, FIRST) == answer_of(local, FIRST)
        assert say(terminal, SECOND) == answer_of(local, FIRST, SECOND)
        terminal.type("/reset\n")
        assert "starts over" in terminal.read_until(lambda out: out.endswith("> "))
        assert say(terminal, SECOND) == answer_of(local, SECOND)
        terminal.type("/exit\n")
        assert terminal.wait() == 0
    assert "Traceback" not in terminal.shown


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(local):
    with Terminal("chat", "--bundle", str(local.bundle.path), "--max-new-tokens", "1000", "--no-speculation") as terminal:
        terminal.read_until(lambda out: out.endswith(PROMPT))
        terminal.type(FIRST + "\n")
        terminal.read_until(lambda out: len(out) > len(FIRST) + 10)  # the answer is streaming
        terminal.ctrl_c()
        assert "[stopped]" in terminal.read_until(lambda out: out.endswith(PROMPT))
        terminal.type("/exit\n")
        assert terminal.wait() == 0
    assert "Traceback" not in terminal.shown and "interrupted" not in terminal.shown


def test_a_conversation_on_a_cluster_is_the_same_and_ctrl_c_frees_the_answer(serving_cluster, local):
    endpoint = serving_cluster.endpoint
    with Terminal("chat", "--coordinator", endpoint, "--max-new-tokens", str(NEW_TOKENS)) as terminal:
        terminal.read_until(lambda out: out.endswith(PROMPT))
        assert say(terminal, FIRST) == answer_of(local, FIRST)
        assert say(terminal, SECOND) == answer_of(local, FIRST, SECOND)
        terminal.type("/exit\n")
        assert terminal.wait() == 0

    with Terminal("chat", "--coordinator", endpoint, "--max-new-tokens", "1000") as terminal, Client(endpoint) as client:
        terminal.read_until(lambda out: out.endswith(PROMPT))
        terminal.type(FIRST + "\n")
        terminal.read_until(lambda out: len(out) > len(FIRST) + 10)
        terminal.ctrl_c()
        assert "[stopped]" in terminal.read_until(lambda out: out.endswith(PROMPT))
        deadline = time.monotonic() + 30
        while client.status().active_requests and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.status().active_requests == 0  # the coordinator let the answer go
        terminal.type("/exit\n")
        assert terminal.wait() == 0


def test_a_bundle_without_a_chat_template_is_refused_in_one_line(local, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(local.bundle.path, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    del manifest["chat_template"]
    (plain / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(run_speed("chat", "--bundle", str(plain)), "has no chat template")

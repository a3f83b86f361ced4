"""Chat prompts: a conversation rendered with the bundle's own chat template (Jinja, as in the model's
GGUF or Hugging Face files), in a sandbox since the template comes with the model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from runtime.core.errors import SpeedError

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 256


@dataclass(frozen=True)
class ChatMessage:
    role: str  # one of ROLES
    content: str


def check_conversation(messages: Sequence[ChatMessage]) -> None:
    """SpeedError with a sentence for a conversation no template should be asked to render."""
    if not messages:
        raise SpeedError("the conversation is empty; send at least one message with role user")
    if len(messages) > MAX_MESSAGES:
        raise SpeedError(f"a conversation may hold at most {MAX_MESSAGES} messages, got {len(messages)}")
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise SpeedError(f"message {index} has role {message.role!r}; a role is one of {', '.join(ROLES)}")
    if messages[-1].role == "assistant":
        raise SpeedError("the conversation ends with the assistant's message; end it with the user's turn")


def chat_prompt(template: str, messages: Sequence[ChatMessage], *, bundle_name: str) -> str:
    """The text the model expects for a conversation, ending where the assistant's answer starts."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not template:
        raise SpeedError(f"bundle {bundle_name} has no chat template; send the prompt as plain text, not as a chat")
    check_conversation(messages)
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return environment.from_string(template).render(
            messages=[{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True)
    except TemplateError as exc:
        raise SpeedError(f"bundle {bundle_name}: its chat template cannot be rendered ({exc})") from None

"""Chat prompts: a user's message rendered with the bundle's own chat template (Jinja, as in the
model's GGUF or Hugging Face files), in a sandbox since the template comes with the model."""

from __future__ import annotations

from runtime.core.errors import SpeedError


def chat_prompt(template: str, message: str, *, bundle_name: str) -> str:
    """The text the model expects for one user message, ending where the assistant's answer starts."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not template:
        raise SpeedError(f"bundle {bundle_name} has no chat template; send the prompt as plain text, without --chat")
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return environment.from_string(template).render(
            messages=[{"role": "user", "content": message}], add_generation_prompt=True)
    except TemplateError as exc:
        raise SpeedError(f"bundle {bundle_name}: its chat template cannot be rendered ({exc})") from None

"""Why decoding stops, and stop strings: end generation at the token that completes any of them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.core.text_enum import TextEnum

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class StopReason(TextEnum):
    EOS = "eos"  # the model ended its answer
    LENGTH = "length"  # max new tokens reached
    STOP = "stop"  # a stop string appeared
    CONTEXT = "context"  # the model's context is full


class StopStrings:
    """Callable on the generated tokens; decodes only a tail long enough to hold the longest string
    (a byte-level token carries at least one byte, a character at most four)."""

    def __init__(self, tokenizer: Tokenizer, strings: list[str]):
        self.tokenizer = tokenizer
        self.strings = [s for s in strings if s]
        self.window = 4 * max((len(s) for s in self.strings), default=0) + 4

    def __bool__(self) -> bool:
        return bool(self.strings)

    def __call__(self, generated: list[int]) -> bool:
        tail = self.tokenizer.decode(generated[-self.window :])
        return any(s in tail for s in self.strings)

    def cut(self, text: str) -> str:
        """The text up to the first stop string, which is not part of the answer."""
        ends = [text.find(s) for s in self.strings if s in text]
        return text[: min(ends)] if ends else text

"""Generated text for streaming: the new text each committed token adds, never a character that a
stop string will later cut, nor half of a character whose bytes span two byte-level tokens."""

from __future__ import annotations

from tokenizers import Tokenizer

from runtime.core.stopping import StopStrings


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: StopStrings):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop.strings), default=1) - 1
        self.emitted = 0  # characters already sent

    def text(self, token_ids: list[int]) -> str:
        return self.stop.cut(self.tokenizer.decode(token_ids))

    def delta(self, token_ids: list[int], *, final: bool) -> str:
        """The text not yet sent that is safe to send now."""
        text = self.text(token_ids)
        end = len(text)
        if not final:
            end -= self.holdback  # it may be the start of a stop string
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1  # the rest of this character's bytes are in a token not committed yet
        if end <= self.emitted:
            return ""
        delta, self.emitted = text[self.emitted : end], end
        return delta

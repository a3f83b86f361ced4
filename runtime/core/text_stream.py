"""Generated text for streaming: the new text each committed token adds, never a character that a
stop string will later cut, nor half of a character whose bytes span two byte-level tokens.

Only the tokens after the last settled ones are decoded (with a few before them, the context a decoder
may need at a word's start), so a token costs the same however long the answer is, where decoding the
whole answer at every token would cost time in proportion to its length."""

from __future__ import annotations

from tokenizers import Tokenizer

from runtime.core.stopping import StopStrings

CONTEXT_TOKENS = 4  # decoded again before the new tokens and taken off: how a decoder starts a word may depend on them
SETTLE_AFTER = 16  # new tokens that are decoded before their text is settled


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: StopStrings):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop.strings), default=1) - 1
        self.emitted = 0  # characters already sent
        self._settled = ""  # the text of the first _settled_tokens tokens, ending in a whole character
        self._settled_tokens = 0

    def text(self, token_ids: list[int]) -> str:
        """The answer's text, up to a stop string. Each call's tokens extend the previous call's (the
        tokens committed so far); a shorter list starts again from nothing."""
        return self.stop.cut(self._decoded(token_ids))

    def _decoded(self, token_ids: list[int]) -> str:
        if len(token_ids) < self._settled_tokens:
            self._settled, self._settled_tokens = "", 0
        start = max(0, self._settled_tokens - CONTEXT_TOKENS)
        context = self.tokenizer.decode(token_ids[start : self._settled_tokens])
        fresh = self.tokenizer.decode(token_ids[start:])
        if fresh.startswith(context):
            text = self._settled + fresh[len(context) :]
        else:  # the new tokens changed how the context reads: decode everything
            text = self.tokenizer.decode(token_ids)
        if len(token_ids) - self._settled_tokens >= SETTLE_AFTER and not text.endswith("\ufffd"):
            self._settled, self._settled_tokens = text, len(token_ids)
        return text

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

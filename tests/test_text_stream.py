"""Streamed text: decoding only the newest tokens gives exactly what decoding the whole answer gives, at
every length, with and without stop strings; the deltas add up to the text."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.core.bundle import load_bundle
from runtime.core.stopping import StopStrings
from runtime.core.text_stream import TextStream

TOKENIZER = load_bundle().tokenizer()
VOCAB = TOKENIZER.get_vocab_size()
# byte tokens that split characters, word starts, special tokens and anything else
TOKENS = st.one_of(st.integers(0, VOCAB - 1), st.sampled_from(TOKENIZER.encode("é ü 漢字 🙂 ROMEO. Enter\n").ids))


@settings(max_examples=60, deadline=None)
@given(st.lists(TOKENS, max_size=80), st.lists(st.sampled_from(["e", "th", "\n", "ROMEO", "漢"]), max_size=2))
def test_the_text_at_every_length_is_that_of_the_whole_answer(token_ids, stop):
    strings = StopStrings(TOKENIZER, stop)
    stream = TextStream(TOKENIZER, strings)
    streamed = []
    for end in range(len(token_ids) + 1):
        assert stream.text(token_ids[:end]) == strings.cut(TOKENIZER.decode(token_ids[:end]))
        streamed.append(stream.delta(token_ids[:end], final=end == len(token_ids)))
    assert "".join(streamed) == strings.cut(TOKENIZER.decode(token_ids))


def test_a_shorter_list_starts_again():
    ids = TOKENIZER.encode("ROMEO. But soft, what light through yonder window breaks? " * 3).ids
    stream = TextStream(TOKENIZER, StopStrings(TOKENIZER, []))
    assert stream.text(ids) == TOKENIZER.decode(ids)
    assert stream.text(ids[:5]) == TOKENIZER.decode(ids[:5])

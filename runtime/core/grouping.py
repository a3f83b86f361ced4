"""Which positions of a sequence run together in one pass: the prompt in chunks from position 0 on, every
later position alone. The kernels give a position other bits in a pass of several positions than in
another grouping (sums over the keys run in another order), so plain decoding, the lockstep scheduler, the
ring and every replay group positions this one way, and a text is the same bits whichever decodes it."""

from __future__ import annotations

PREFILL_CHUNK = 64  # prompt positions per pass, unless a cluster file's speculation.prefill_chunk says otherwise


def pass_end(start: int, prompt_length: int, chunk: int) -> int:
    """The end (exclusive) of the pass that runs positions from `start` on."""
    return min(prompt_length, start + chunk) if start < prompt_length else start + 1

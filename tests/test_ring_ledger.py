"""The coordinator's record of a ring sequence: commits in position order, the usual ends."""

import pytest

from runtime.core.ring import RingError
from runtime.core.ring_ledger import RingLedger
from runtime.core.stopping import StopReason

PROMPT = [5, 6, 7]


def ledger_with(**options) -> RingLedger:
    ledger = RingLedger(3)
    ledger.add(1, PROMPT, **{"context_length": 64, "max_new_tokens": 4, **options})
    return ledger


def test_commits_append_in_position_order_and_a_repeat_changes_nothing():
    ledger = ledger_with()
    assert ledger.commit(1, 3, 40) and ledger.commit(1, 4, 41)
    assert not ledger.commit(1, 3, 99)  # committed before a replay: already known
    assert ledger.sequences[1].generated == [40, 41]
    with pytest.raises(RingError, match="a commit at position 7 before the one at 5"):
        ledger.commit(1, 7, 42)


@pytest.mark.parametrize(("options", "tokens", "reason", "generated"), [
    ({}, [40, 41, 42, 43], StopReason.LENGTH, [40, 41, 42, 43]),
    ({"eos_id": 0}, [40, 0], StopReason.EOS, [40]),
    ({"should_stop": lambda generated: generated[-1] == 41}, [40, 41], StopReason.STOP, [40, 41]),
    ({"context_length": 5, "max_new_tokens": 10}, [40, 41, 42], StopReason.CONTEXT, [40, 41, 42]),  # positions 0-4 run
])
def test_a_sequence_ends_by_the_same_rules_as_the_scheduler(options, tokens, reason, generated):
    ledger = ledger_with(**options)
    for position, token in enumerate(tokens, start=len(PROMPT)):
        ledger.commit(1, position, token)
    seq = ledger.sequences[1]
    assert seq.stop_reason == reason and seq.generated == generated
    assert not ledger.commit(1, len(PROMPT) + len(tokens), 7)  # nothing after the end


def test_a_rewind_prefills_the_prompt_and_the_committed_tokens():
    ledger = ledger_with()
    ledger.commit(1, 3, 40)
    ledger.rewind(1)
    assert ledger.sequences[1].prefill == PROMPT + [40]

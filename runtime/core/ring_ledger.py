"""What the coordinator knows of each sequence on the ring data path: its prompt, the tokens committed so
far and whether it has ended. Commits come from the node of the last stage in position order; the
ledger applies the same end rules (end of sequence, stop strings, length, context) as the scheduler."""

from __future__ import annotations

from runtime.core.ring import RingError
from runtime.core.scheduler import SequenceState, new_sequence
from runtime.core.stopping import StopReason


class RingLedger:
    def __init__(self, n_stages: int):
        self.n_stages = n_stages
        self.sequences: dict[int, SequenceState] = {}

    def add(self, seq_id: int, prompt: list[int], **options) -> SequenceState:
        """options: those of new_sequence."""
        if seq_id in self.sequences:
            raise ValueError(f"sequence {seq_id} already exists")
        seq = self.sequences[seq_id] = new_sequence(seq_id, prompt, n_stages=self.n_stages, **options)
        return seq

    def commit(self, seq_id: int, position: int, token: int) -> bool:
        """Apply a commit; False when it changes nothing (the sequence ended, or the position was
        committed before a replay)."""
        seq = self.sequences.get(seq_id)
        if seq is None or seq.done:
            return False
        expected = len(seq.prompt) + len(seq.generated)
        if position < expected:
            return False
        if position > expected:
            raise RingError(f"sequence {seq_id}: a commit at position {position} before the one at {expected}")
        if not seq.commit(token) and len(seq.prompt) + len(seq.generated) > seq.last_position + 1:
            seq.stop_reason = StopReason.CONTEXT  # no position is left to run
        return True

    def rewind(self, seq_id: int) -> None:
        """The sequence starts again on new caches: its prefill is the prompt and every committed token."""
        seq = self.sequences[seq_id]
        seq.prefill = seq.prompt + seq.generated

    def remove(self, seq_id: int) -> SequenceState:
        return self.sequences.pop(seq_id)


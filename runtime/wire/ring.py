"""The ring data path's messages on the wire, checked whole before they reach a node's state machine."""

from __future__ import annotations

from runtime.core.errors import SpeedError
from runtime.core.ring import Commit, Correction, Hop
from runtime.wire import speed_pb2 as pb
from runtime.wire.tensor import pack, unpack


def hop_to_wire(hop: Hop) -> pb.RingHop:
    return pb.RingHop(seq_id=hop.seq_id, gen=hop.gen, stage=hop.stage, start=hop.start, tokens=hop.tokens,
                      committed=hop.committed, hidden=pack(hop.payload))


def correction_to_wire(c: Correction) -> pb.RingCorrection:
    return pb.RingCorrection(seq_id=c.seq_id, gen=c.gen, position=c.position, token=c.token, found_at=c.found_at)


def commit_to_wire(c: Commit) -> pb.RingCommit:
    return pb.RingCommit(seq_id=c.seq_id, position=c.position, token=c.token)


def commit_from_wire(c: pb.RingCommit) -> Commit:
    return Commit(c.seq_id, c.position, c.token)


def forwarded(messages: list, *, incarnation: int, epoch: int) -> pb.Forwarded:
    out = pb.Forwarded(incarnation=incarnation, epoch=epoch)
    for m in messages:
        if isinstance(m, Hop):
            out.hops.append(hop_to_wire(m))
        elif isinstance(m, Correction):
            out.corrections.append(correction_to_wire(m))
        else:
            out.commits.append(commit_to_wire(m))
    return out


def messages_from_wire(message: pb.Forwarded, *, d_model: int, vocab_size: int, context_length: int) -> list:
    """The hops, corrections and commits of one Forwarded message, or SpeedError naming what is malformed."""
    out: list = []
    for h in message.hops:
        where = f"a hop of sequence {h.seq_id} at position {h.start}"
        if not 1 <= len(h.tokens) <= context_length or not 0 <= h.start < context_length:
            raise SpeedError(f"{where} must carry 1 to {context_length} positions inside the context")
        _tokens(h.tokens, vocab_size, where)
        hidden = unpack(h.hidden, dtype="float32", shape=(len(h.tokens), d_model), what=f"{where}: the hidden state",
                        finite=True)
        out.append(Hop(h.seq_id, h.gen, h.stage, h.start, tuple(h.tokens), h.committed, hidden))  # a read-only view
    for c in message.corrections:
        _tokens([c.token], vocab_size, f"a correction of sequence {c.seq_id}")
        out.append(Correction(c.seq_id, c.gen, c.position, c.token, c.found_at))
    for c in message.commits:
        _tokens([c.token], vocab_size, f"a commit of sequence {c.seq_id}")
        out.append(commit_from_wire(c))
    return out


def _tokens(tokens, vocab_size: int, where: str) -> None:
    if not all(0 <= t < vocab_size for t in tokens):
        raise SpeedError(f"{where}: token ids must be in 0..{vocab_size - 1}")

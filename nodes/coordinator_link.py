"""A node's end of its coordinator's link for one placement (proto/speed/v1/speed.proto, "Direct links"): the
link's own thread (nodes/link_listener.py) reads the ring's control from it, and the stage worker writes the
node's events to it itself, one frame for what a round of work produced. Only where a link latency is
EMULATED does a delay line, and its thread, sit in the path.

A write that fails ends the link: its reader then sees the end, which stops the ring, and the coordinator takes
the end for the node's loss and replays."""

from __future__ import annotations

import logging
import threading

from nodes.delay_line import DelayLine
from runtime.executor.cpu_profile import CpuProfile
from runtime.wire import speed_pb2 as pb
from runtime.wire.framed_connection import FramedConnection
from runtime.wire.frames import frame

log = logging.getLogger("speed.node")


class CoordinatorLink:
    def __init__(self, connection: FramedConnection, *, delay_s: float, profile: CpuProfile):
        self._connection = connection
        self._profile = profile
        self._line = DelayLine(delay_s) if delay_s > 0 else None  # EMULATION only
        if self._line is not None:
            threading.Thread(target=self._pump, daemon=True, name="link-to-coordinator").start()

    def send(self, events: pb.RingEvents) -> None:
        with self._profile.timed("serialize"):
            data = frame(events.SerializeToString())
        if self._line is None:
            self._write(data)
        else:
            self._line.put(data)

    def close(self) -> None:
        """Send nothing more and end the link: with a delay line, once what is in it has arrived."""
        if self._line is None:
            self._connection.end()
        else:
            self._line.close()

    def _pump(self) -> None:
        for batch in self._line.batches():
            self._write(b"".join(batch))
        self._connection.end()

    def _write(self, data: bytes) -> None:
        try:
            self._connection.send(data)
        except OSError as exc:
            log.warning("the coordinator's link broke (%s); the coordinator replays what this node held",
                        str(exc) or type(exc).__name__)
            self._connection.end()

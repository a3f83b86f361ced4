"""Round trips from a node to the other nodes of its ring, measured after each assignment: what placing
stages by link speed needs to know.

A small frame is echoed a few times over a direct link dialled like the ring's own (a probe link: the peer
sends every frame back), so the time is what a hop's transport costs, TLS included; the median is kept. The
probe runs on a thread of its own, so an assignment never waits for it; a peer that does not answer is left
out.
"""

from __future__ import annotations

import logging
import threading

from nodes.peer_links import Dialler
from nodes.self_measure import median_ms
from runtime.core.errors import SpeedError
from runtime.wire import speed_pb2 as pb
from runtime.wire.frames import frame, read_frame

log = logging.getLogger("speed.node")
PINGS = 5
PING_TIMEOUT_S = 2.0
PING_BYTES = 64  # about a commit's message; a hop's hidden states add their bytes' transfer time


class LinkProbe:
    def __init__(self, dial: Dialler):
        self._dial = dial
        self._lock = threading.Lock()
        self._times: dict[str, float] = {}
        self._round = 0  # a newer assignment's probe replaces an older one's results

    def measure(self, peers: dict[str, str]) -> None:
        """Start timing the round trip to each peer (name -> the address of its direct links), replacing what was
        measured before."""
        with self._lock:
            self._round += 1
            self._times = {}
            round_ = self._round
        threading.Thread(target=self._run, args=(peers, round_), name="link-probe", daemon=True).start()

    def times(self) -> list[pb.LinkTime]:
        with self._lock:
            return [pb.LinkTime(node=name, rtt_ms=ms) for name, ms in sorted(self._times.items())]

    def _run(self, peers: dict[str, str], round_: int) -> None:
        for name, address in peers.items():
            ms = self._round_trip_ms(name, address)
            with self._lock:
                if round_ != self._round:
                    return
                if ms is not None:
                    self._times[name] = ms

    def _round_trip_ms(self, name: str, address: str) -> float | None:
        try:
            with self._dial(name, address, probe=True) as link, link.makefile("rb") as echoes:
                link.settimeout(PING_TIMEOUT_S)

                def ping() -> None:
                    link.sendall(frame(bytes(PING_BYTES)))
                    if read_frame(echoes, PING_BYTES) is None:
                        raise SpeedError("the link closed")

                return median_ms(ping, PINGS)
        except (OSError, SpeedError) as exc:  # LinkRefused is a SpeedError
            log.info("could not time the link to node %s at %s: %s", name, address, str(exc) or type(exc).__name__)
            return None

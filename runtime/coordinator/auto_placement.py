"""`placement: auto`: which node runs which stage, chosen by the data path's timing model from what the serving
nodes measured of themselves (pass times, classifier, link round trips) and the flip rates seen so far
(else the bundle's), whenever the set of serving nodes changes (runtime/core/placement_search.py does the
choosing); with what the current placement's requests measured, the model first learns what a run costs
beside its pass and, on the ring, what a node's messages beyond one a run cost it.

Also what `speed plan` predicts with: the nodes' timings, the links' one-way latencies and the model
under the cluster file's speculation settings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from runtime.coordinator.remote_node import time_passes_again
from runtime.core.bundle import Bundle
from runtime.core.cluster_file import ClusterSpec
from runtime.core.generation import guess_thresholds
from runtime.core.placement import stages_of
from runtime.core.placement_search import TimingModel, choose, fit_cost, fit_guesses, hostable_by
from runtime.core.ring_timing import NodeTiming

log = logging.getLogger("speed.coordinator")
MEASURE_TIMEOUT_STEPS = 10  # a node times its passes again within this many step timeouts
PRIOR_CHECKS = 50  # the bundle's flip rate weighs as much as this many checks the coordinator saw


def node_timings(nodes) -> dict[str, NodeTiming]:
    """What each node that measured itself reported (NodeStatus or NodeInfo messages, by name)."""
    return {node.name: NodeTiming({(p.stage, p.rows): p.ms for p in node.pass_times}, node.head_ms,
                                  machine=node.machine.id, machine_cores=node.machine.cores, cores_used=node.cores_used)
            for node in nodes if node.pass_times}


def link_ms(spec: ClusterSpec, links: Mapping[str, list]) -> Callable[[str, str], float]:
    """One-way latency from one node to another (or to and from "coordinator"): half the round trip the
    sender measured (or the receiver, or 0 where neither did), plus the sender's emulated link latency.
    links: node -> its LinkTimes."""
    rtt = {(name, link.node): link.rtt_ms for name, times in links.items() for link in times}
    emulated = {node.name: node.emulated_link_ms for node in spec.nodes}

    def one_way(src: str, dst: str) -> float:
        return rtt.get((src, dst), rtt.get((dst, src), 0.0)) / 2 + emulated.get(src, 0.0)

    return one_way


def flip_rates(bundle: Bundle, flips: Sequence[int], checks: Sequence[int]) -> tuple[tuple[float, ...], str]:
    """Per stage boundary, how often its checks find a guess wrong, and where the figures come from: what the
    coordinator counted, weighed with the bundle's figure as if it were PRIOR_CHECKS more checks (a boundary
    the ring checks rarely, the one after a stage whose guesses seldom pass, still says what it saw)."""
    rates, source = bundle.guess_flip_rates()
    counted = list(zip(flips, checks))[: len(rates)]
    if not any(checked for _, checked in counted):
        return rates, source
    blended = tuple((wrong + PRIOR_CHECKS * rate) / (checked + PRIOR_CHECKS)
                    for (wrong, checked), rate in zip(counted, rates))
    return blended, (f"seen by the coordinator: {sum(checks)} guesses checked, with {source} as {PRIOR_CHECKS} more a "
                     "boundary")


def timing_model(spec: ClusterSpec, bundle: Bundle, timings: Mapping[str, NodeTiming],
                 one_way: Callable[[str, str], float], flips: tuple[float, ...]) -> TimingModel:
    """The timing model of the file's data path under its speculation settings."""
    thresholds = guess_thresholds((spec.speculation.guess_threshold,), bundle.guess_thresholds, bundle.config.n_stages)
    speculation = spec.speculation
    return TimingModel(timings, one_way, flips, thresholds, speculation.enabled, speculation.window,
                       speculation.prefill_chunk, data_path=str(spec.data_path))


def calibrated(model: TimingModel, placed: Mapping[int, str], sequential: float,
               speculative: float) -> tuple[TimingModel, str | None]:
    """The model whose synthetic guesses make `placed` count the flip rates seen (fit_guesses), with the costs
    that what `placed` measured implies (tokens/s of its requests decoding alone, 0 where none), and what they
    were fitted to (None without a measurement). The cost of a run is fitted to sequential decoding where there
    is one: nothing but passes, hops and what each run costs make its time. On the ring, speculation then fits
    what a message beyond one a run costs: a speculating head sends the next node a hop for every guess, most
    of them flushed before they run."""
    if len(placed) != len(model.flips) + 1 or not set(placed.values()) <= set(model.timings):
        return model, None
    fitted_to = None
    if sequential > 0:
        overhead = fit_cost(model, placed, "run_overhead_ms", speculate=False, measured=sequential)
        model, fitted_to = replace(model, run_overhead_ms=overhead), "sequential"
        if speculative > 0 and model.mode == "speculative" and model.data_path == "ring":
            messages = fit_cost(fit_guesses(model, placed), placed, "message_ms", speculate=True, measured=speculative)
            model, fitted_to = replace(model, message_ms=messages), "sequential and speculative"
    elif speculative > 0:
        overhead = fit_cost(fit_guesses(model, placed), placed, "run_overhead_ms", speculate=True, measured=speculative)
        model, fitted_to = replace(model, run_overhead_ms=overhead), "speculative"
    return fit_guesses(model, placed), fitted_to


class AutoPlacement:
    """Chooses the stages' homes among the serving nodes; the engine's failover rule places from them. Each
    choice starts by having every serving node time its passes again, one node of a machine at a time."""

    def __init__(self, spec: ClusterSpec, bundle: Bundle, seen: Callable[[], tuple[Sequence[int], Sequence[int]]],
                 measured: Callable[[], tuple[Mapping[int, str], float, float]]):
        """seen: the flips and checks per stage boundary the coordinator has seen so far; measured: the
        current placement and the tokens/s its requests decoding alone measured, sequential and speculative
        (0 without any), which fit the cost of a run beside its pass."""
        self.spec, self.bundle, self.seen, self.measured = spec, bundle, seen, measured

    async def homes(self, nodes: list, start: dict[int, str]) -> dict[str, tuple[int, ...]] | None:
        """Each serving node's stages (RemoteNodes, with their registration's measurements); None to keep
        the file's homes (a node measured nothing). start: where the stages would run without a choice."""
        await time_passes_again(nodes, self.spec.coordinator.step_timeout_s * MEASURE_TIMEOUT_STEPS)
        timings = node_timings(node.info for node in nodes)
        unmeasured = [node.name for node in nodes if node.name not in timings]
        if unmeasured:
            log.warning("placement: auto keeps the cluster file's stages: %s reported no pass times",
                        ", ".join(unmeasured))
            return None
        flips, _ = flip_rates(self.bundle, *self.seen())
        model = timing_model(self.spec, self.bundle, timings, link_ms(self.spec, {node.name: node.links for node in nodes}),
                           flips)
        hostable = hostable_by(timings, self.bundle.config.n_stages)
        model, _ = await asyncio.to_thread(calibrated, model, *self.measured())
        chosen = await asyncio.to_thread(choose, model, start, hostable)  # a few hundred ms of simulation
        log.info("placement: auto chose %s, predicted %.1f tokens/s %s", "  ".join(
            f"{node.name}: {','.join(map(str, chosen.stages_of(node.name))) or '-'}" for node in nodes),
                 chosen.rate(model.mode), model.mode)
        return {node.name: tuple(stages_of(chosen.placement, node.name)) for node in nodes}

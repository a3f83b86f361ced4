"""End to end: a real cluster of processes on loopback (coordinator + three nodes, one stage each of the
shipped demo model) gives exactly the single-process reference's tokens, in every mode."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from deploy.launcher import LocalCluster
from runtime.client import AsyncClient, Client, InvalidRequest, Unavailable
from runtime.core.cluster_file import DataPathKind, load_cluster
from runtime.core.sampling import GREEDY, SamplingParams
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.enums import node_state_of
from runtime.wire.security import member_channel
from tests.conftest import CLUSTER_NEW_TOKENS as NEW_TOKENS
from tests.conftest import CLUSTER_PROMPTS as PROMPTS
from tests.conftest import assert_one_line_error, generate_on, in_threads, run_speed, running_cluster, write_cluster
from tests.terminal import Terminal, read_until, with_ctrl_c

pytestmark = pytest.mark.cluster  # its tests start real processes on loopback

SAMPLED = [SamplingParams(temperature=0.8, top_k=40, seed=7), SamplingParams(temperature=1.0, top_p=0.9, seed=123)]


@pytest.fixture(scope="module", params=["lockstep", "ring"])
def cluster(request, tmp_path_factory):
    """The same behaviour whichever way the work travels: every tick through the coordinator, or node to node."""
    with running_cluster(tmp_path_factory.mktemp("cluster"), extra_top_keys=f"data_path: {request.param}\n") as running:
        yield running


@pytest.mark.parametrize("speculative", [False, True], ids=["sequential", "speculative"])
def test_the_cluster_gives_the_reference_tokens_greedy_and_sampled(cluster, reference, speculative):
    with Client(cluster.endpoint) as client:
        for prompt in PROMPTS:
            for sampling in [GREEDY, *SAMPLED]:
                result = generate_on(client, prompt, sampling, speculative=speculative)
                assert result.token_ids == reference(prompt, sampling), (prompt, sampling)
                assert result.speculative == speculative
                assert result.stats.committed == len(result.token_ids)


def test_a_prompt_of_several_prefill_chunks_gives_the_reference_tokens(cluster, reference):
    long_prompt = " ".join(PROMPTS * 3)  # 141 tokens: three passes of the default 64
    with Client(cluster.endpoint) as client:
        for speculative in (False, True):
            for sampling in [GREEDY, SAMPLED[0]]:
                result = generate_on(client, long_prompt, sampling, speculative=speculative)
                assert result.token_ids == reference(long_prompt, sampling), (speculative, sampling)


def test_a_confidence_gate_holds_guesses_back_and_keeps_the_text(cluster, reference):
    """The nodes report each guess's probability; the coordinator's gate holds the unsure ones back."""
    held = {}
    with Client(cluster.endpoint) as client:
        for threshold in (0.3, 0.9):
            for sampling in [GREEDY, SAMPLED[0]]:
                result = generate_on(client, PROMPTS[0], sampling, speculative=True, guess_threshold=threshold)
                assert result.token_ids == reference(PROMPTS[0], sampling), (threshold, sampling)
                held[threshold, sampling.temperature] = result.stats.held_guesses
    for temperature in (0.0, SAMPLED[0].temperature):
        assert 0 < held[0.3, temperature] < held[0.9, temperature]


def test_four_concurrent_clients_share_ticks_and_each_gets_its_own_text(cluster, reference):
    def one(index: int) -> list[int]:
        with Client(cluster.endpoint) as client:
            return generate_on(client, PROMPTS[index], max_new_tokens=48).token_ids

    results, errors = in_threads(one, 4)
    assert not errors
    for index, prompt in enumerate(PROMPTS):
        assert results[index] == reference(prompt, max_new_tokens=48)


def test_the_stream_carries_the_text_in_pieces_and_stops_at_a_stop_string(cluster, reference):
    stop = ["Warwick"]  # after five lines of text
    with Client(cluster.endpoint) as client:
        stream = client.generate(PROMPTS[1], max_new_tokens=64, stop=stop)
        pieces = [chunk.text for chunk in stream]
        result = stream.result()
    assert len(pieces) > 1
    assert "".join(pieces) == result.text
    assert result.text.count("\n") >= 4 and "Warwick" not in result.text
    assert result.stop_reason == "stop"
    assert result.token_ids == reference(PROMPTS[1], max_new_tokens=64, stop=tuple(stop))


def test_the_asyncio_client_streams_the_same_tokens(cluster, reference):
    async def run() -> tuple[list[int], str]:
        async with AsyncClient(cluster.endpoint) as client:
            stream = client.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS)
            ids = [token for chunk in [c async for c in stream] for token in chunk.token_ids]
            return ids, (await stream.result()).text

    ids, text = asyncio.run(run())
    assert ids == reference(PROMPTS[1])
    assert text


def test_bad_requests_get_a_sentence_and_the_cluster_keeps_serving(cluster):
    with Client(cluster.endpoint) as client:
        with pytest.raises(InvalidRequest, match="prompt is empty"):
            client.generate("").result()
        with pytest.raises(InvalidRequest, match="context holds 1024"):
            client.generate("word " * 1200).result()
        with pytest.raises(InvalidRequest, match="temperature must be 0"):
            client.generate("Hi", temperature=-1.0).result()
        with pytest.raises(InvalidRequest, match="top-p must be in"):
            client.generate("Hi", temperature=1.0, top_p=1.5).result()
        assert client.status().serving
        assert generate_on(client, PROMPTS[2], max_new_tokens=4).token_ids


def test_speed_generate_prints_the_reference_json_keys(cluster):
    result = run_speed("generate", "--coordinator", cluster.endpoint, "--json", "--max-new-tokens", "8", PROMPTS[0])
    assert result.returncode == 0, result.stderr
    cluster_json = json.loads(result.stdout)
    reference = run_speed("reference", "--json", "--max-new-tokens", "8", PROMPTS[0])
    reference_json = json.loads(reference.stdout)
    assert set(reference_json) <= set(cluster_json)
    assert cluster_json["token_ids"] == reference_json["token_ids"]
    assert set(cluster_json["stats"]) == {"ticks", "committed", "flips_per_boundary", "flushed_steps", "mean_in_flight",
                                          "held_guesses"}


def test_a_client_that_goes_away_has_its_caches_freed_on_every_node(cluster):
    with Client(cluster.endpoint) as client:
        stream = client.generate(PROMPTS[0], max_new_tokens=1000, ignore_eos=True)  # seconds of work left
        next(iter(stream))  # decoding has started
        stream.cancel()
        deadline = time.monotonic() + 2
        while client.status().active_requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.status().active_requests == 0
    for node in load_cluster(cluster.path).nodes:
        with member_channel(cluster.spec, node.address) as channel:
            while pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=5).open_sequences and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
            assert pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=5).open_sequences == 0, node.name


STATUS_COLUMNS = ["node", "address", "state", "stages", "sequences", "step ms", "tokens/s", "pass ms", "cores",
                  "free MB", "heartbeat", "provider"]


def busy_status(cluster, *args: str) -> subprocess.CompletedProcess:
    """`speed status ARGS` right after a generation, once every node's heartbeat (every 0.5 s in these
    clusters) reports the batches it ran: the nodes' window holds them for 10 s."""
    with Client(cluster.endpoint) as client:
        generate_on(client, PROMPTS[0], max_new_tokens=8)
        deadline = time.monotonic() + 10
        while not all(n.step_ms > 0 and n.positions_per_s > 0 for n in client.status().nodes):
            assert time.monotonic() < deadline, client.status()
            time.sleep(0.1)
    result = run_speed("status", "--coordinator", cluster.endpoint, *args)
    assert result.returncode == 0, result.stderr
    return result


def test_speed_status_lists_every_node_serving(cluster):
    lines = busy_status(cluster).stdout.splitlines()
    assert lines[0].startswith("cluster test-") and ": serving," in lines[0]
    assert "\x1b" not in "".join(lines)  # piped: plain text, no ANSI codes
    assert re.split(r"\s{2,}", lines[1].strip()) == STATUS_COLUMNS
    rows = {row[0]: dict(zip(STATUS_COLUMNS, row)) for row in (re.split(r"\s{2,}", line.strip()) for line in lines[3:])}
    assert sorted(rows) == ["edge-1", "edge-2", "edge-3"]
    for name, stage in [("edge-1", 0), ("edge-2", 1), ("edge-3", 2)]:
        row = rows[name]
        assert (row["state"], row["stages"], row["provider"]) == ("serving", str(stage), "CPU"), row
        assert float(row["step ms"]) > 0 and float(row["tokens/s"]) > 0, row
        assert float(row["pass ms"]) > 0 and float(row["free MB"]) > 0, row  # what the node measured of itself
        assert row["cores"] == f"1/{len(os.sched_getaffinity(0))}", row  # one thread, on this machine's cores
        assert row["heartbeat"].endswith(" s ago") and row["sequences"].endswith("/8"), row


def test_speed_status_json_is_one_object_with_each_nodes_load(cluster):
    ring = cluster.spec.data_path == DataPathKind.RING
    with Client(cluster.endpoint) as client:  # a ring node times its links after its assignment, in the background
        deadline = time.monotonic() + 10
        while ring and not all(len(node.links) == 2 for node in client.status().nodes):
            assert time.monotonic() < deadline, client.status()
            time.sleep(0.1)
    status = json.loads(busy_status(cluster, "--json").stdout)
    assert status["serving"] is True and status["active_requests"] == 0
    for node in status["nodes"]:
        assert node["state"] == "serving" and node["step_ms"] > 0 and node["positions_per_s"] > 0, node
        # measured by the node itself at start: each stage it can host (any, the demo's layers being shared) at the
        # row counts of a tick; the stages run one graph, timed once
        assert {(p["stage"], p["rows"]) for p in node["pass_times"]} == {(s, r) for s in range(3) for r in (1, 2, 4)}
        assert all(len({p["ms"] for p in node["pass_times"] if p["rows"] == rows}) == 1 for rows in (1, 2, 4)), node
        assert all(p["ms"] > 0 for p in node["pass_times"]) and node["head_ms"] > 0, node
        assert int(node["memory_available_bytes"]) > 0, node
    # one machine: the same id, whose cores every node's passes share
    assert len({node["machine"]["id"] for node in status["nodes"]}) == 1
    assert all(node["cores_used"] == 1 and node["machine"]["cores"] >= 1 for node in status["nodes"]), status["nodes"]
    # round trips to the other nodes of its ring; lockstep nodes do not talk to each other
    links = {node["name"]: {link["node"] for link in node["links"] if link["rtt_ms"] > 0} for node in status["nodes"]}
    names = {"edge-1", "edge-2", "edge-3"}
    assert links == {name: names - {name} if ring else set() for name in names}


def test_speed_plan_predicts_every_placement_with_the_file_s_own_first(cluster, reference):
    with Client(cluster.endpoint) as client:  # a request alone: what the plan calibrates by
        assert generate_on(client, PROMPTS[0], speculative=True).token_ids == reference(PROMPTS[0])
    result = run_speed("plan", str(cluster.spec.path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    own, *others = report["candidates"]
    assert own["files_own"] and own["placement"] == {"edge-1": [0], "edge-2": [1], "edge-3": [2]}
    assert len(others) == 3**3 - 1  # the demo's layers are shared: any node can host any stage
    assert all(c["sequential_tokens_per_s"] > 0 and c["speculative_tokens_per_s"] > 0 for c in report["candidates"])
    best = [c["speculative_tokens_per_s"] for c in others]
    assert best == sorted(best, reverse=True) and len(report["flips"]) == 2
    seen = json.loads(run_speed("status", "--coordinator", cluster.endpoint, "--json").stdout)["flips"]
    assert [count["boundary"] for count in seen] == [0, 1] and all(int(c["checks"]) > 0 for c in seen)
    assert own["current"] and report["data_path"] == str(cluster.spec.data_path)
    seen = json.loads(run_speed("status", "--coordinator", cluster.endpoint, "--json").stdout)
    # the cost of a run fitted to sequential requests where some ran alone before (and then, on the ring, what a
    # message costs to the speculative ones), else to the speculative ones
    mode, *then = report["calibration"]["fitted_to"].split(" and ")
    assert mode in ("sequential", "speculative") and report["calibration"]["run_overhead_ms"] >= 0
    assert then == (["speculative"] if mode == "sequential" and report["data_path"] == "ring" else [])
    assert own[f"calibrated_{mode}_tokens_per_s"] == pytest.approx(seen[f"alone_{mode}_tokens_per_s"], rel=0.05)
    shown = run_speed("plan", str(cluster.spec.path), "--top", "2")
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 5, shown.stdout  # the calibration's line
    assert f"predicted for the {cluster.spec.data_path} data path" in shown.stdout
    planned = cluster.spec.path.parent / "planned.yaml"
    written = run_speed("plan", str(cluster.spec.path), "--json", "--write", str(planned))
    assert written.returncode == 0 and f"wrote {planned}: " in written.stderr, written.stderr
    report = json.loads(written.stdout)  # the links' round trips, and so the ranking, may differ from above
    best = max(report["candidates"], key=lambda c: c[report["mode"] + "_tokens_per_s"])["placement"]
    assert {node.name: list(node.stages) for node in load_cluster(planned).nodes} == best


def test_speed_plan_of_a_cluster_that_is_not_running_says_so(tmp_path):
    assert_one_line_error(run_speed("plan", str(write_cluster(tmp_path))), "cannot reach the coordinator")


def test_speed_status_watch_refreshes_on_a_terminal_until_ctrl_c(cluster):
    with Terminal("status", "--coordinator", cluster.endpoint, "--watch", "--interval", "0.2",
                  term="xterm-256color") as watch:
        shown = watch.read_until(lambda out: out.count("tokens/s") >= 2, 60)
        assert shown.count("tokens/s") >= 2 and "edge-3" in shown, shown
        watch.ctrl_c()
        assert watch.wait() == 0, watch.shown
    assert "Traceback" not in watch.shown and "interrupted" not in watch.shown, watch.shown


def test_speed_generate_without_a_cluster_says_so_in_one_line():
    assert_one_line_error(run_speed("generate", "--coordinator", "127.0.0.1:9", "Hello"), "cannot reach the coordinator")


def test_a_node_killed_mid_generation_is_replaced_and_the_text_is_unchanged(cluster, reference):
    with Client(cluster.endpoint) as client:
        stream = client.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
        chunks = iter(stream)
        received = list(next(chunks).token_ids)  # decoding has started
        os.kill(cluster.processes["edge-2"].pid, signal.SIGKILL)
        received += [token for chunk in chunks for token in chunk.token_ids]
        assert stream.result().token_ids == received == reference(PROMPTS[0])
        cluster.processes.pop("edge-2").wait()
        status = client.status()
        assert status.serving and {n.name: node_state_of(n) for n in status.nodes}["edge-2"] == "down"
        assert {n.name: list(n.hosting) for n in status.nodes} == {"edge-1": [0, 1], "edge-2": [], "edge-3": [2]}
        assert generate_on(client, PROMPTS[1]).token_ids == reference(PROMPTS[1])  # two nodes serve on

        cluster.start_process("edge-2")  # the node registers again by itself and takes its stage back
        cluster.wait_ready(60)
        assert generate_on(client, PROMPTS[1]).token_ids == reference(PROMPTS[1])


def test_a_restarted_coordinator_serves_again_without_restarting_the_nodes(cluster, reference):
    """... and `speed status --watch` says so while it is gone, then shows the new one."""
    nodes_before = {name: p.pid for name, p in cluster.processes.items() if name != "coordinator"}
    watch = subprocess.Popen([sys.executable, "-m", "runtime.cli", "status", "--coordinator", cluster.endpoint,
                              "--watch", "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"}, preexec_fn=with_ctrl_c)
    try:
        assert ": serving," in read_until(watch.stdout.fileno(), lambda out: ": serving," in out, 60)
        cluster.stop_process("coordinator")
        gone = read_until(watch.stdout.fileno(), lambda out: "cannot reach the coordinator" in out, 30)
        cluster.start_process("coordinator")
        cluster.wait_ready(60)
        back = read_until(watch.stdout.fileno(), lambda out: ": serving," in out, 30)
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=30) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        watch.stdout.close()
    assert f"cannot reach the coordinator {cluster.endpoint} since " in gone, gone
    assert ": serving," in back and "Traceback" not in gone + back, back
    assert {name: p.pid for name, p in cluster.processes.items() if name != "coordinator"} == nodes_before
    with Client(cluster.endpoint) as client:
        assert generate_on(client, PROMPTS[3], speculative=True).token_ids == reference(PROMPTS[3])


def test_a_coordinator_whose_nodes_never_came_says_which_node_is_missing(tmp_path, state_dir):
    lonely = LocalCluster(write_cluster(tmp_path))
    lonely.start_process("coordinator")
    try:
        deadline = time.monotonic() + 60
        with Client(lonely.endpoint) as client:
            while True:
                try:
                    status = client.status(timeout_s=1)
                    break
                except Unavailable:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            assert not status.serving and {node_state_of(n) for n in status.nodes} == {"waiting"}
            with pytest.raises(Unavailable, match="node edge-1 .* is waiting"):
                client.generate("Hello").result()
    finally:
        lonely.stop()

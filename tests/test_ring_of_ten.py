"""A ring of ten node processes, one stage each, under concurrent requests: every text equals plain
decoding's, and every node answers Info within a second while it streams (no stream holds the thread a
short call needs)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from deploy.launcher import LocalCluster
from runtime.client import Client
from runtime.core.bundle import load_bundle
from runtime.core.cluster_file import load_cluster
from runtime.core.config import ModelConfig
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain
from runtime.models.decoder import SpeedDecoder
from runtime.wire import speed_pb2 as pb
from runtime.wire import speed_pb2_grpc as pb_grpc
from runtime.wire.security import member_channel
from tests.conftest import in_threads, run_speed, write_cluster
from tests.gguf_writer import write_gguf

pytestmark = [pytest.mark.cluster, pytest.mark.training]  # a model is built with torch, then ten processes run it

NODES = 10
REQUESTS = 12  # more than a node's sequence slots: some wait in the coordinator's queue
NEW_TOKENS = 24
PROMPTS = ["To be, or not to be", "Enter a Messenger.", "My lord, 12 ships", "O Romeo, Romeo!"]
INFO_WITHIN_S = 1.0
DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "runtime" / "bundles" / "demo-4x3" / "tokenizer.json"


@pytest.fixture(scope="module")
def ten_stages(tmp_path_factory) -> Path:
    """A random 10-layer Llama, written as GGUF and imported as ten stages of one layer."""
    tokenizer_json = json.loads(DEMO_TOKENIZER.read_text())
    torch.manual_seed(0)
    model = SpeedDecoder(ModelConfig(vocab_size=len(tokenizer_json["model"]["vocab"]) + 2, d_model=64, n_heads=4,
                                     n_kv_heads=2, ffn_hidden=128, n_distinct_layers=NODES, n_stages=NODES,
                                     context_length=256, shared_layers=False))
    directory = tmp_path_factory.mktemp("ten")
    write_gguf(directory / "ten.gguf", model, tokenizer_json)
    result = run_speed("import", "gguf", str(directory / "ten.gguf"), str(directory / "bundle"), "--stages", str(NODES),
                       "--no-calibrate")
    assert result.returncode == 0, result.stderr
    return directory / "bundle"


def test_ten_nodes_decode_the_reference_text_and_answer_info_while_they_stream(ten_stages, tmp_path, state_dir):
    bundle = load_bundle(ten_stages)
    model, tokenizer = open_stage_model(bundle), bundle.tokenizer()
    expected = {prompt: generate_plain(model, tokenizer.encode(prompt).ids, max_new_tokens=NEW_TOKENS,
                                       eos_id=-1).token_ids for prompt in PROMPTS}
    path = write_cluster(tmp_path, bundle=ten_stages, stages=[[stage] for stage in range(NODES)],
                         extra_top_keys="data_path: ring\n")
    nodes = load_cluster(path).nodes
    slowest_info: dict[str, float] = {}
    streaming = threading.Event()
    done = threading.Event()

    def ask_info() -> None:
        """Info of every node, again and again while requests stream; the slowest answer of each."""
        channels = {node.name: member_channel(load_cluster(path), node.address) for node in nodes}
        try:
            streaming.wait(timeout=120)
            while not done.is_set():
                for name, channel in channels.items():
                    started = time.monotonic()
                    pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=10)
                    slowest_info[name] = max(slowest_info.get(name, 0.0), time.monotonic() - started)
                time.sleep(0.05)
        finally:
            for channel in channels.values():
                channel.close()

    with LocalCluster(path) as cluster, Client(cluster.endpoint) as client:
        prober = threading.Thread(target=ask_info)
        prober.start()

        def decode(index: int) -> tuple[str, list[int]]:
            prompt = PROMPTS[index % len(PROMPTS)]
            stream = client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, speculative=index % 2 == 0)
            chunks = iter(stream)
            first = next(chunks)
            streaming.set()
            return prompt, [*first.token_ids, *(t for chunk in chunks for t in chunk.token_ids)]

        try:
            results, errors = in_threads(decode, REQUESTS)
        finally:
            done.set()
            prober.join(timeout=60)
    assert not errors
    assert len(results) == REQUESTS and all(tokens == expected[prompt] for prompt, tokens in results.values())
    assert set(slowest_info) == {node.name for node in nodes}
    assert max(slowest_info.values()) < INFO_WITHIN_S, slowest_info

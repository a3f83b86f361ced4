"""Whatever a cluster file holds, loading it either gives a spec or one SpeedError naming the file: the full
example with one to three values anywhere replaced by YAML of any type, or keys dropped."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.core.cluster_file import load_cluster
from runtime.core.errors import SpeedError

FULL = {
    "cluster": "fuzz",
    "bundle": None,
    "coordinator": {"address": "127.0.0.1:50050", "step_timeout_s": 3.0, "heartbeat_interval_s": 1.0,
                    "max_queue": 64, "metrics_port": 9150, "http_address": "127.0.0.1:8000"},
    "data_path": "ring",
    "speculation": {"enabled": True, "prefill_chunk": 64, "window": 8, "guess_threshold": 0.5},
    "nodes": [
        {"name": "edge-1", "address": "127.0.0.1:50051", "stages": [0], "standby_stages": [1], "device": "cpu",
         "cpu_fallback": False, "threads": 1, "max_sequences": 8, "idle_timeout_s": 300, "emulated_link_ms": 0,
         "metrics_port": 9151},
        {"name": "edge-2", "address": "127.0.0.1:50052", "stages": [1, 2]},
    ],
    "security": {"certs": "certs", "client_auth": "token"},
    "insecure": False,
    "secret_file": "cluster.secret",
}

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=40), st.just("127.0.0.1:99999"), st.just("[::1]:50050"), st.just(".."))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)


def places(data, path=()):
    """Every key path of a nested mapping or list."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        yield (*path, key)
        yield from places(value, (*path, key))


PLACES = list(places(FULL))


@st.composite
def mutated(draw) -> dict:
    data = copy.deepcopy(FULL)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PLACES))
        parent = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = draw(VALUES)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed or replaced the place
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_any_cluster_file_loads_or_gets_one_sentence_naming_it(data):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "cluster.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
        try:
            load_cluster(path)
        except SpeedError as exc:
            message = str(exc)
            assert str(path) in message and "\n" not in message and "Traceback" not in message

"""A bundle's manifest is checked where it is loaded: whatever manifest.json holds, loading either succeeds, and
then everything the runtime reads of the bundle works, or fails with one SpeedError naming the bundle and the key."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from runtime.core.bundle import DEFAULT_BUNDLE, Bundle, load_bundle
from runtime.core.errors import SpeedError
from runtime.core.generation import guess_thresholds
from tests.conftest import assert_one_line_error, run_speed

DEMO = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())
V, D = DEMO["model_config"]["vocab_size"], DEMO["model_config"]["d_model"]
REEXPORT = "re-export the bundle (speed export / speed import gguf)"
RAW = "\u0000raw\u0000"  # a placeholder for JSON text that json.dumps cannot write (see raw_texts)


def add_file(directory: Path, manifest: dict, name: str, data: bytes) -> str:
    (directory / name).write_bytes(data)
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return name


def manifests_of(directory: Path) -> dict[str, dict]:
    """The demo's manifest as shipped, and two that use every optional part: low-rank exits, a guess head and a
    gate; layer exits and an int8 embedding. Their extra files are written into `directory`."""
    rank, early = 2, DEMO["model_config"]["n_stages"] - 1
    extended = copy.deepcopy(DEMO)
    table = np.zeros((early, 2 * D * rank), "<f4").tobytes()
    extended["exits"] = {"kind": "low-rank", "stages": list(range(early)), "rank": rank, "report": {},
                         "files": [add_file(directory, extended, "exit_adapters.bin", table)]}
    tokens = np.arange(16, dtype="<i8").tobytes()
    extended["guess_head"] = {"graph": add_file(directory, extended, "guess_head.onnx", b"graph"), "size": 16,
                              "tokens": add_file(directory, extended, "guess_tokens.bin", tokens)}
    extended["guess_gate"] = {"thresholds": [0.5, 0.25], "report": {}}
    quantized = copy.deepcopy(DEMO)
    quantized["exits"] = {"kind": "layer", "stages": list(range(early)), "report": {},
                          "files": [add_file(directory, quantized, f"exit_layer_{s}.onnx", b"layer") for s in range(early)]}
    quantized["embedding"] = {"file": add_file(directory, quantized, "embedding.int8.bin", bytes(V * D)),
                              "shape": [V, D], "dtype": "int8",
                              "row_scales": add_file(directory, quantized, "embedding.scales.bin", bytes(4 * V))}
    quantized["quantization"] = {"weights": "int4"}
    quantized["guess_head"], quantized["guess_gate"] = None, None
    return {"demo": DEMO, "extended": extended, "quantized": quantized}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return shutil.copytree(DEFAULT_BUNDLE, tmp_path_factory.mktemp("manifest") / "demo")


@pytest.fixture(scope="module")
def manifests(bundle_dir) -> dict[str, dict]:
    return manifests_of(bundle_dir)


def write(directory: Path, manifest, raw: str = "") -> None:
    text = json.dumps(manifest)
    (directory / "manifest.json").write_text(text.replace(json.dumps(RAW), raw))


def use(bundle: Bundle) -> None:
    """Read everything of the bundle that the runtime reads."""
    config = bundle.config
    assert len(bundle.stage_graphs) == len(bundle.graph_ids) == config.n_stages
    files = bundle.files_for(range(config.n_stages))
    bundle.verify(files | {bundle.manifest["tokenizer"]})
    for path in [*bundle.stage_graphs, bundle.head_graph, *bundle.exit_layer_graphs().values()]:
        assert len(bundle.file_sha256(path)) == 64
    assert 0 <= bundle.eos_token_id < config.vocab_size
    assert isinstance(bundle.chat_template, str) and isinstance(bundle.answers_questions, bool)
    assert bundle.embedding()[np.array([0, config.vocab_size - 1])].shape == (2, config.d_model)
    vocabulary = bundle.guess_vocabulary()
    assert (vocabulary is None) == (bundle.guess_head_graph is None)
    hidden = np.zeros((1, config.d_model), np.float32)
    for exit_map in bundle.exit_maps().values():
        assert exit_map.apply(hidden).shape == hidden.shape
    assert len(guess_thresholds((None,), bundle.guess_thresholds, config.n_stages)) in (0, config.n_stages - 1)
    assert isinstance(bundle.quantized, bool) and isinstance(bundle.manifest["name"], str)


def key_paths(value, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value, the root's () included."""
    if isinstance(value, dict):
        children = value.items()
    elif isinstance(value, list):
        children = enumerate(value)
    else:
        children = ()
    return [prefix] + [path for key, child in children for path in key_paths(child, (*prefix, key))]


def mutate(manifest, path: tuple, value, drop: bool):
    """The manifest with the value at `path` dropped, or replaced by `value`."""
    if not path:
        return value
    manifest = copy.deepcopy(manifest)
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if drop:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return manifest


NAMES = ["stage.onnx", "head.onnx", "embedding.bin", "tokenizer.json", "exit_adapters.bin", "guess_tokens.bin",
         "manifest.json", "missing.bin", "..", ".", "../demo/head.onnx", "/etc/hostname", "x" * 300, "\udc80", ""]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from([-1, 0, 1, 2, 3, 4, 255, 256, V, V - 1, 2**31, 2**63, 10**300, 1.0, 0.5, 1e308, -0.0, "NaN",
                     "nan", "inf", "-Infinity", "1e999", "<f4", "<f8", "int8", "q8_0", "float32", "low-rank", "affine",
                     "layer", "0" * 64, "A" * 64, *NAMES]))
keys = st.sampled_from(["file", "shape", "dtype", "graph", "tokens", "sha256", "bytes", "kind", "stages", "files",
                        "rank", "thresholds", "row_scales", "block_scales", "format"]) | st.text(max_size=6)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                           max_leaves=8)
raw_texts = st.sampled_from(["1" * 5000, "1e999", "-1e999", "NaN", "-Infinity", "[" * 100_000 + "]" * 100_000])


@st.composite
def mutated_manifests(draw, manifests: dict[str, dict]) -> tuple[object, str]:
    """(manifest, raw JSON text for the placeholder): one to three keys dropped or given other values."""
    manifest = manifests[draw(st.sampled_from(sorted(manifests)))]
    raw = ""
    for _ in range(draw(st.integers(1, 3))):
        paths = key_paths(manifest)
        path = draw(st.sampled_from(paths))
        drop = bool(path) and draw(st.booleans())
        value = draw(json_values)
        if not raw and draw(st.integers(0, 9)) == 0:
            value, raw = RAW, draw(raw_texts)
        manifest = mutate(manifest, path, value, drop)
    return manifest, raw


def load_or_refuse(directory: Path) -> Bundle | None:
    """The bundle, or None when loading refused it with one line naming the bundle; any other exception fails."""
    try:
        return load_bundle(directory)
    except SpeedError as exc:
        message = str(exc)
        assert message.startswith(f"bundle {directory}") or f"{directory} is not a bundle" in message, message
        assert "\n" not in message, message
        return None


def test_the_shipped_manifests_load_and_everything_in_them_is_usable(bundle_dir, manifests):
    for manifest in manifests.values():
        write(bundle_dir, manifest)
        use(load_bundle(bundle_dir))


@settings(max_examples=200, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_any_mutated_manifest_loads_or_is_refused_with_a_sentence(bundle_dir, manifests, data):
    manifest, raw = data.draw(mutated_manifests(manifests))
    write(bundle_dir, manifest, raw)
    bundle = load_or_refuse(bundle_dir)
    event("loaded" if bundle is not None else "refused")
    if bundle is not None:
        use(bundle)


@pytest.mark.parametrize("path, value, drop, fragment", [
    (("files",), None, True, "key files is missing, expected a mapping of"),
    (("files",), [], False, "key files is [], expected a mapping of"),
    (("name",), None, True, "key name is missing"),
    (("name",), 7, False, "key name is 7, expected"),
    (("eos_token_id",), "0", False, f'key eos_token_id is "0", expected a token id from 0 to {V - 1}'),
    (("eos_token_id",), V, False, f"key eos_token_id is {V}, expected a token id from 0 to {V - 1}"),
    (("stages",), [{"graph": "stage.onnx"}], False, "key stages is [{\"graph\": \"stage.onnx\"}], expected a list of 3"),
    (("stages", 1, "graph"), "other.onnx", False, 'key stages[1].graph is "other.onnx", expected the name of a file'),
    (("head",), None, True, "key head is missing"),
    (("embedding", "shape"), [V, D + 1], False, f"key embedding.shape is [{V}, {D + 1}], expected [{V}, {D}]"),
    (("embedding", "dtype"), "<f8", False, 'key embedding.dtype is "<f8", expected "<f4", "int8" or "q8_0"'),
    (("files", "embedding.bin", "bytes"), 5, False, 'key files["embedding.bin"].bytes is 5, expected 4194304'),
    (("files", "head.onnx", "sha256"), "abc", False, 'key files["head.onnx"].sha256 is "abc", expected 64'),
    (("model_config", "d_model"), "256", False, "key model_config is not a valid model config (model config d_model"),
    (("model_config", "rope_base"), float("nan"), False, "model config rope_base: expected a finite"),
    (("exits",), {"kind": "lowrank"}, False, 'key exits.kind is "lowrank", expected "layer", "low-rank" or "affine"'),
    (("guess_gate",), {"thresholds": [0.5]}, False, "key guess_gate.thresholds is [0.5], expected a list of 2"),
    (("guess_head",), {"graph": "head.onnx"}, False, "key guess_head.tokens is missing"),
    (("chat_template",), ["x"], False, 'key chat_template is ["x"], expected'),
])
def test_a_wrong_key_is_named_with_what_was_expected(bundle_dir, path, value, drop, fragment):
    write(bundle_dir, mutate(DEMO, path, value, drop))
    with pytest.raises(SpeedError) as refused:
        load_bundle(bundle_dir)
    message = str(refused.value)
    assert message.startswith(f"bundle {bundle_dir}: manifest.json key ") and message.endswith(f"; {REEXPORT}"), message
    assert fragment in message


@pytest.mark.parametrize("name", ["../demo/head.onnx", "/etc/hostname", "..", "manifest.json", "\udc80", "x" * 300])
def test_a_file_name_outside_the_bundle_or_not_a_name_is_refused(bundle_dir, name):
    write(bundle_dir, mutate(DEMO, ("files", name), {"sha256": "0" * 64, "bytes": 1}, False))
    with pytest.raises(SpeedError, match=r"key files lists .*, expected only names of files in the bundle directory"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("raw", ["1" * 5000, "[" * 100_000 + "]" * 100_000])
def test_json_python_cannot_hold_is_refused(bundle_dir, raw):
    write(bundle_dir, RAW, raw)
    with pytest.raises(SpeedError, match=f"bundle {bundle_dir}: manifest.json "):
        load_bundle(bundle_dir)


def test_a_file_of_another_size_than_its_manifest_says_is_named_without_hashing(bundle_dir):
    write(bundle_dir, DEMO)
    report = bundle_dir / "training_report.json"
    original = report.read_bytes()
    try:
        report.write_bytes(original[:-1])
        changed = "training_report.json does not match its sha256 in manifest.json (801 bytes where it lists 802)"
        with pytest.raises(SpeedError, match=re.escape(changed)):
            load_bundle(bundle_dir, verify=False)
    finally:
        report.write_bytes(original)


@pytest.mark.cluster
def test_the_command_line_says_what_is_wrong_with_the_manifest_in_one_line(bundle_dir):
    write(bundle_dir, mutate(DEMO, ("files",), None, True))
    result = run_speed("reference", "--bundle", str(bundle_dir), "--max-new-tokens", "2", "hi")
    assert_one_line_error(result, f"bundle {bundle_dir}: manifest.json key files is missing", REEXPORT)

"""Loading a bundle verifies every file and names the one that does not match."""

import json
import shutil

import pytest

from runtime.core.bundle import load_bundle
from runtime.core.errors import SpeedError


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "copy")


def test_an_intact_bundle_loads(bundle_copy):
    bundle = load_bundle(bundle_copy)
    assert bundle.config.n_stages == 3
    assert len(bundle.sha256) == 64
    assert bundle.embedding().shape == (bundle.config.vocab_size, bundle.config.d_model)


@pytest.mark.parametrize("name", ["stage.onnx", "head.onnx", "embedding.bin", "tokenizer.json"])
def test_a_tampered_file_is_named(bundle_copy, name):
    path = bundle_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SpeedError, match=f"{name} does not match its sha256"):
        load_bundle(bundle_copy)


def test_a_missing_file_is_named(bundle_copy):
    (bundle_copy / "head.onnx").unlink()
    with pytest.raises(SpeedError, match="head.onnx is missing"):
        load_bundle(bundle_copy)


def test_a_directory_without_a_manifest_is_not_a_bundle(tmp_path):
    with pytest.raises(SpeedError, match="has no manifest.json"):
        load_bundle(tmp_path)


def test_a_missing_directory_is_reported(tmp_path):
    with pytest.raises(SpeedError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_a_manifest_that_is_not_json_is_reported(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(SpeedError, match="manifest.json is not valid JSON"):
        load_bundle(bundle_copy)


def test_a_foreign_manifest_is_refused(bundle_copy):
    (bundle_copy / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(SpeedError, match="is not a 'speed-bundle/1' manifest"):
        load_bundle(bundle_copy)


def test_a_file_is_not_reported_as_missing(tmp_path):
    (tmp_path / "bundle.onnx").write_bytes(b"\0")
    with pytest.raises(SpeedError, match=r"bundle .*bundle\.onnx is a file, not a bundle directory; pass a directory"):
        load_bundle(tmp_path / "bundle.onnx")


def test_a_process_verifies_just_the_files_it_reads(bundle_copy):
    tokenizer = bundle_copy / "tokenizer.json"
    data = bytearray(tokenizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tokenizer.write_bytes(bytes(data))
    bundle = load_bundle(bundle_copy, verify=False)  # present, not hashed
    node_files = bundle.files_for([0])
    assert node_files == {"stage.onnx", "head.onnx", "embedding.bin"}  # a node does not read the tokenizer
    bundle.verify(node_files)
    with pytest.raises(SpeedError, match="tokenizer.json does not match its sha256"):
        bundle.verify(["tokenizer.json"])  # what a coordinator reads

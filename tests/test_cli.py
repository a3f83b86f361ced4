"""Bad input at the command line: one line naming the problem, a non-zero exit, nothing written."""

import json
import shutil

import pytest

from tests.conftest import assert_one_line_error, run_speed


def test_reference_prints_json_with_the_generated_tokens(tiny_bundle):
    result = run_speed("reference", "--bundle", str(tiny_bundle), "--max-new-tokens", "8", "--json", "ROMEO:")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) <= 8 and out["token_ids"]
    assert isinstance(out["text"], str) and out["tokens_per_s"] >= 0
    assert out["backend"] == "onnx" and out["provider"] == "CPUExecutionProvider"


def test_reference_backends_agree_from_the_command_line(tiny_bundle):
    outputs = [
        json.loads(run_speed("reference", "--bundle", str(tiny_bundle), "--backend", backend,
                             "--max-new-tokens", "12", "--json", "Good morrow").stdout)
        for backend in ("onnx", "torch")
    ]
    assert outputs[0]["token_ids"] == outputs[1]["token_ids"]


def test_empty_prompt(tiny_bundle):
    assert_one_line_error(run_speed("reference", "--bundle", str(tiny_bundle), ""), "prompt is empty")


def test_prompt_longer_than_the_context(tiny_bundle):
    result = run_speed("reference", "--bundle", str(tiny_bundle), "word " * 1000)
    assert_one_line_error(result, "the model's context holds 640")


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_max_new_tokens(tiny_bundle, value):
    result = run_speed("reference", "--bundle", str(tiny_bundle), f"--max-new-tokens={value}", "hello")
    assert_one_line_error(result, "--max-new-tokens")


def test_missing_bundle(tmp_path):
    assert_one_line_error(run_speed("reference", "--bundle", str(tmp_path / "absent"), "hi"), "does not exist")


def test_tampered_bundle(tiny_bundle, tmp_path):
    copy = shutil.copytree(tiny_bundle, tmp_path / "copy")
    with (copy / "stage.onnx").open("ab") as f:
        f.write(b"\0")
    assert_one_line_error(run_speed("reference", "--bundle", str(copy), "hi"), "stage.onnx does not match")


def test_exporting_something_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "notes.pt"
    bogus.write_text("these are not weights")
    out = tmp_path / "bundle"
    assert_one_line_error(run_speed("export", str(bogus), str(out)), "is not a SPEED checkpoint")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.pt"]


def test_exporting_a_missing_checkpoint(tmp_path):
    assert_one_line_error(run_speed("export", str(tmp_path / "nope.pt"), str(tmp_path / "b")), "does not exist")
    assert not (tmp_path / "b").exists()


def test_export_refuses_to_overwrite(tiny_checkpoint, tiny_bundle):
    before = (tiny_bundle / "manifest.json").read_text()
    assert_one_line_error(run_speed("export", str(tiny_checkpoint), str(tiny_bundle)), "already exists", "--force")
    assert (tiny_bundle / "manifest.json").read_text() == before


def test_bench_reference_prints_its_figures_as_json(tiny_bundle):
    result = run_speed("bench", "--reference", "--bundle", str(tiny_bundle), "--new-tokens", "4", "--repeats", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["tokens_per_s"]) == {"onnx", "torch", "context_32", "context_512"}
    assert report["onnx_over_torch"] > 0 and report["context_512_over_32"] > 0


def test_bench_local_prints_speedup_and_cost_model_as_json(tiny_bundle):
    result = run_speed("bench", "--local", "--bundle", str(tiny_bundle), "--new-tokens", "6", "--repeats", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["speedup"] > 0 and report["predicted_speedup"] > 0
    assert len(report["flips_per_boundary"]) == 2
    assert report["steps_per_token"]["measured"] >= 1


def test_bench_without_a_mode_says_what_to_choose():
    assert_one_line_error(run_speed("bench"), "--reference", "--local")

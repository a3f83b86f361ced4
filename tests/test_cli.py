"""Bad input at the command line: one line naming the problem, a non-zero exit, nothing written."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.cli.main import build_parser
from tests.conftest import assert_one_line_error, run_speed

pytestmark = pytest.mark.cluster  # its tests start real processes on loopback


def test_reference_prints_json_with_the_generated_tokens(tiny_bundle):
    result = run_speed("reference", "--bundle", str(tiny_bundle), "--max-new-tokens", "8", "--json", "ROMEO:")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) <= 8 and out["token_ids"]
    assert isinstance(out["text"], str) and out["tokens_per_s"] >= 0
    assert out["backend"] == "onnx" and out["provider"] == "CPUExecutionProvider"


def test_a_reader_that_goes_away_ends_the_output_quietly(tiny_bundle):
    """`speed reference --json ... | head -c 0`: the pipe is closed before anything is written."""
    process = subprocess.Popen([sys.executable, "-m", "runtime.cli", "reference", "--bundle", str(tiny_bundle),
                                "--max-new-tokens", "4", "--json", "ROMEO:"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    process.stdout.close()
    _, err = process.communicate(timeout=300)
    assert err == b"" and process.returncode == 141  # as a process that SIGPIPE ended


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
    assert set(report["tokens_per_s"]) == {"onnx", "torch", "context_32", "context_512", "threads_1", "threads_2"}
    assert report["onnx_over_torch"] > 0 and report["context_512_over_32"] > 0
    assert report["bundle_bytes"] == sum(f.stat().st_size for f in tiny_bundle.iterdir() if f.name != "manifest.json")


def test_bench_local_prints_speedup_and_cost_model_as_json(tiny_bundle):
    result = run_speed("bench", "--local", "--bundle", str(tiny_bundle), "--new-tokens", "6", "--repeats", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["speedup"] > 0 and report["predicted_speedup"] > 0
    assert len(report["flips_per_boundary"]) == 2
    assert report["steps_per_token"]["measured"] >= 1
    assert report["temperature"] == 0
    stages = json.loads((tiny_bundle / "manifest.json").read_text())["model_config"]["n_stages"]
    sequential = report["time_per_token"]["sequential"]  # a token: every stage's run and the classifier's
    assert sequential["onnx_runtime_calls"]["runs"] == stages + 1 and sequential["ms"] > 0


def test_bench_local_samples_with_temperature(tiny_bundle):
    result = run_speed("bench", "--local", "--bundle", str(tiny_bundle), "--new-tokens", "6", "--repeats", "1",
                       "--temperature", "0.8")
    assert result.returncode == 0, result.stderr
    assert "sampled at temperature 0.8" in result.stdout
    assert_one_line_error(run_speed("bench", "--agreement", str(tiny_bundle), "--bundle", str(tiny_bundle),
                                    "--temperature", "0.8"), "--temperature applies to")


def test_bench_against_llama_cpp_says_what_it_needs(tiny_bundle, tmp_path):
    """The comparison itself is a benchmark on a real GGUF file; what it refuses is checked here."""
    missing = tmp_path / "model.gguf"
    assert_one_line_error(run_speed("bench", "--llama-cpp", str(missing)), "--llama-cpp GGUF needs --bundle")
    assert_one_line_error(run_speed("bench", "--llama-cpp", str(missing), "--bundle", str(tiny_bundle)),
                          f"{missing} does not exist; give the GGUF file the bundle was imported from")
    assert_one_line_error(run_speed("bench", "--llama-cpp", str(missing), "--bundle", str(tiny_bundle), "--local"),
                          "--llama-cpp compares greedy decoding in one process")


def test_bench_without_a_mode_says_what_to_choose():
    assert_one_line_error(run_speed("bench"), "--reference", "--local")


# --- arguments an attacker or a careless user might give: refused in one line before anything runs ----------

NOT_UTF8 = "\udcff\udcfe\udc80abc"  # the bytes ff fe 80 61 62 63, as Python hands such an argument over


@pytest.mark.parametrize("args, position", [
    (["reference", NOT_UTF8], 2),
    (["generate", "--json", NOT_UTF8], 3),
    (["reference", "--stop", NOT_UTF8, "hi"], 3),
    (["export", "{tmp}/checkpoint.pt", "{tmp}/" + NOT_UTF8], 3),
])
def test_an_argument_that_is_not_utf8_is_refused_by_position(tmp_path, args, position):
    result = run_speed(*(arg.replace("{tmp}", str(tmp_path)) for arg in args), timeout=60)
    assert_one_line_error(result, f"argument {position} is not valid UTF-8 text; pass text in UTF-8")
    assert result.returncode == 2
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["10000", "257", "-3"])
@pytest.mark.parametrize("command", [["reference", "hi"], ["bench", "--local"], ["train", "--out", "{tmp}/run"]])
def test_threads_out_of_range_are_refused_before_any_work(tmp_path, command, value):
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in command]
    result = run_speed(*args, "--threads", value, timeout=30)  # 10000 threads hung decoding for over a minute
    assert_one_line_error(result, "argument --threads: must be at least 0 and at most 256 (0 = one per core)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["reference", "bench", "train"])
def test_every_threads_flag_documents_zero_and_its_bound(command):
    help_text = " ".join(run_speed(command, "--help", timeout=30).stdout.split())
    assert "0 = one per core" in help_text and "at most 256" in help_text
    prompt = ["hi"] if command == "reference" else ["--out", "x"] if command == "train" else []
    assert build_parser().parse_args([command, *prompt, "--threads", "0"]).threads == 0


@pytest.mark.parametrize("args, flag", [
    (["generate", "--temperature", "nan", "hi"], "--temperature"),
    (["generate", "--temperature", "1e39", "hi"], "--temperature"),
    (["generate", "--top-k", "3000000000", "hi"], "--top-k"),
    (["generate", "--top-p", "inf", "hi"], "--top-p"),
    (["generate", "--seed", str(2**63), "hi"], "--seed"),
    (["generate", "--max-new-tokens", "3000000000", "hi"], "--max-new-tokens"),
    (["generate", "--timeout", "1e300", "hi"], "--timeout"),
    (["reference", "--seed", "-1", "hi"], "--seed"),
    (["up", "{tmp}/cluster.yaml", "--emulate-link-ms", "nan"], "--emulate-link-ms"),
    (["node", "--cluster", "{tmp}/cluster.yaml", "--name", "a", "--emulate-link-ms", "-1"], "--emulate-link-ms"),
    (["bench", "--repeats", "100000"], "--repeats"),
    (["bench", "{tmp}/cluster.yaml", "--clients", "1000000"], "--clients"),
    (["train", "--out", "{tmp}/run", "--lr", "nan"], "--lr"),
    (["train", "--out", "{tmp}/run", "--d-model", "1" + "0" * 12], "--d-model"),
    (["train-exit", "{tmp}/bundle", "--rank", "1" + "0" * 12], "--rank"),
    (["import", "gguf", "{tmp}/model.gguf", "{tmp}/bundle", "--stages", "5000"], "--stages"),
])
def test_a_number_out_of_range_is_a_usage_error(tmp_path, args, flag):
    result = run_speed(*(arg.replace("{tmp}", str(tmp_path)) for arg in args), timeout=60)
    assert_one_line_error(result, f"argument {flag}: must be ")
    assert result.returncode == 2 and list(tmp_path.iterdir()) == []


def numeric_options(parser: argparse.ArgumentParser, prefix: str = "speed"):
    """(command, option) of every flag of every subcommand that takes a number."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from numeric_options(sub, f"{prefix} {name}")
        elif action.option_strings and action.type not in (None, str, Path):
            yield prefix, action


def test_every_numeric_flag_refuses_nan_infinity_and_absurd_values():
    found = list(numeric_options(build_parser()))
    assert len(found) >= 30
    for command, action in found:
        where = f"{command} {action.option_strings[0]}"
        assert action.type not in (int, float), f"{where} takes any {action.type.__name__}"
        for text in ["nan", "inf", "-inf", "1e400", "9" * 30, "-" + "9" * 30, "abc", ""]:
            with pytest.raises(argparse.ArgumentTypeError):
                action.type(text)
                pytest.fail(f"{where} accepted {text!r}")
        if action.default is not None:
            assert action.type(str(action.default)) == action.default, f"{where}: its default is out of its range"


def test_documented_zero_values_are_kept():
    args = build_parser().parse_args(["generate", "--temperature", "0", "--top-k", "0", "--top-p", "1", "hi"])
    assert (args.temperature, args.top_k, args.top_p) == (0, 0, 1)
    args = build_parser().parse_args(["generate", "--seed", str(2**63 - 1), "--top-p", "0.01", "hi"])
    assert args.seed == 2**63 - 1 and args.top_p == 0.01


@pytest.mark.parametrize("command", [["reference", "hi"], ["bench", "--local"]])
def test_a_bundle_that_is_a_file_is_named_as_a_file(tmp_path, command):
    (tmp_path / "bundle.txt").write_text("not a bundle")
    result = run_speed(*command, "--bundle", str(tmp_path / "bundle.txt"), timeout=60)
    assert_one_line_error(result, f"bundle {tmp_path / 'bundle.txt'} is a file, not a bundle directory; pass a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.txt"]

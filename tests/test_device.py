"""The CUDA provider is used only when it really loads; otherwise the request is refused clearly."""

import json

import pytest

from tests.conftest import HAS_GPU, assert_one_line_error, run_speed


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the refusal cannot be observed")
def test_cuda_without_a_gpu_is_refused_in_one_sentence(tiny_bundle):
    result = run_speed("reference", "--bundle", str(tiny_bundle), "--device", "cuda", "hello")
    assert_one_line_error(result, "device cuda was requested", "CPUExecutionProvider")


@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_cuda_decoding_runs_on_the_cuda_provider(tiny_bundle):
    result = run_speed("reference", "--bundle", str(tiny_bundle), "--device", "cuda", "--json", "hello")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["provider"] == "CUDAExecutionProvider"
    assert out["token_ids"]

"""The CUDA provider is used only when it really loads; otherwise the request is refused clearly. Where there is
a GPU, its caches stay on it, its decode ticks are replayed as CUDA graphs, and the text is what plain decoding
gives, with and without the graphs."""

import json

import pytest

from runtime.core.bundle import load_bundle
from runtime.core.sampling import SamplingParams
from tests.conftest import HAS_GPU, assert_one_line_error, run_speed

needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the refusal cannot be observed")
def test_cuda_without_a_gpu_is_refused_in_one_sentence():
    result = run_speed("reference", "--device", "cuda", "hello")
    assert_one_line_error(result, "device cuda was requested", "CPUExecutionProvider")


@needs_gpu
def test_cuda_decoding_runs_on_the_cuda_provider():
    result = run_speed("reference", "--device", "cuda", "--json", "hello")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["provider"] == "CUDAExecutionProvider"
    assert out["token_ids"]


@needs_gpu
@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, seed=3),
                                      SamplingParams(temperature=0.8, top_k=40, seed=3)],
                         ids=["greedy", "sampled", "sampled-top-k"])
def test_on_cuda_the_caches_stay_on_the_gpu_and_speculation_gives_the_plain_text(sampling):
    from runtime.executor.device_cache import DeviceKVCache
    from runtime.executor.onnx_stage_model import OnnxStageModel
    from runtime.local.plain import generate_plain
    from runtime.local.speculative import generate_speculative

    bundle = load_bundle()
    model = OnnxStageModel(bundle, device="cuda", threads=1)
    assert model.device_resident and isinstance(model.new_cache(rows=2, capacity=16), DeviceKVCache)
    assert model.cuda_graphs
    without_graphs = OnnxStageModel(bundle, device="cuda", threads=1, decode_tiles=False)
    prompts = [bundle.tokenizer().encode(text).ids for text in ("ROMEO. But soft, what light", "Enter a Messenger.")]
    kwargs = {"max_new_tokens": 48, "eos_id": -1, "sampling": sampling}
    plain = [generate_plain(without_graphs, prompt, **kwargs).token_ids for prompt in prompts]
    for decoding in (model, without_graphs):
        assert [g.token_ids for g in generate_speculative(decoding, prompts, **kwargs)] == plain
    assert [generate_plain(model, prompt, **kwargs).token_ids for prompt in prompts] == plain


def test_what_onnx_runtime_says_loading_cuda_s_libraries_goes_to_the_log_not_to_stdout(monkeypatch, capsys, caplog):
    """A command's stdout is its JSON: ONNX Runtime's preload_dlls prints what it cannot load, and the session's own
    start then says whether CUDA runs."""
    import logging

    import onnxruntime as ort

    from runtime.executor.onnx_session import load_cuda_libraries

    def preload_dlls():
        print("Failed to load libcublasLt.so.13: not found")
        raise RuntimeError("no nvidia packages")

    monkeypatch.setattr(ort, "preload_dlls", preload_dlls, raising=False)
    with caplog.at_level(logging.INFO, logger="speed.node"):
        load_cuda_libraries.__wrapped__()
    assert capsys.readouterr().out == ""
    assert "Failed to load libcublasLt.so.13: not found no nvidia packages" in caplog.text

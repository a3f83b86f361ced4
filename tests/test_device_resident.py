"""State kept where the graphs run (the path GPU nodes take), computed on the CPU provider: stage graphs that
write their own caches, bound by address, give the bundle graphs' bits and text and write nothing outside a
row's room, whether a call binds its span of rows or runs as a decode tile over every row (what a GPU captures
as a CUDA graph); classification fetches greedy tokens and their probabilities, and a drawn row's largest logits,
every logit only where those cannot decide its draw."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.bench.token_time import time_per_token
from runtime.core.bundle import DEFAULT_BUNDLE, ExitMap, load_bundle
from runtime.core.sampling import SamplingParams
from runtime.core.scheduler import Item, TickPlan
from runtime.executor import draws
from runtime.executor.device_cache import DeviceKVCache
from runtime.executor.draws import classify_rows, guess_probability
from runtime.executor.kept_states import FROM_HIDDEN, FROM_TOKEN, RIDES
from runtime.executor.kv_cache import KVCache
from runtime.executor.onnx_stage_model import OnnxStageModel
from runtime.executor.stage_model import KeptRows
from runtime.executor.tick_executor import TickExecutor
from runtime.local.plain import generate_plain
from runtime.local.speculative import generate_speculative
from runtime.models.quantize import Quantization, quantize_bundle


@pytest.fixture(scope="module")
def models() -> tuple[OnnxStageModel, OnnxStageModel]:
    """The demo bundle run by its own graphs, the host writing the caches (what the derived graphs are derived
    from), and as a GPU runs it without decode tiles."""
    bundle = load_bundle()
    return (OnnxStageModel(bundle, threads=1, fused_attention=False),
            OnnxStageModel(bundle, threads=1, device_resident=True))


@pytest.fixture(scope="module")
def tiled() -> OnnxStageModel:
    """The demo bundle as a GPU runs it by default: decode ticks as tiles over every row of their cache."""
    return OnnxStageModel(load_bundle(), threads=1, device_resident=True, decode_tiles=True)


def filled(cache: KVCache, lengths: list[int], seed: int) -> KVCache:
    rng = np.random.default_rng(seed)
    cache.keys[...] = rng.standard_normal(cache.keys.shape)
    cache.values[...] = rng.standard_normal(cache.values.shape)
    cache.lengths[:] = lengths
    return cache


calls = st.fixed_dictionaries({
    "stage": st.integers(0, 2),
    "tokens": st.integers(1, 5),
    "lengths": st.lists(st.integers(0, 32), min_size=1, max_size=5),  # 32: a full row of a 32-entry cache
    "first": st.integers(0, 2),  # rows before the call's span
    "seed": st.integers(0, 2**32 - 1),
})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=calls)
def test_a_graph_writing_its_cache_computes_and_writes_what_the_host_would(models, tiled, call):
    """Rows with room get the same entries; full rows riding along, and with a decode tile the rows outside the
    call, keep every entry they hold."""
    host_model, writing_model = models
    cfg = host_model.config
    lengths = [0] * call["first"] + call["lengths"]
    rows = slice(call["first"], len(lengths))
    T = call["tokens"]
    hidden = np.random.default_rng(call["seed"]).standard_normal((len(call["lengths"]), T, cfg.d_model)).astype(np.float32)
    host = filled(KVCache(cfg, rows=len(lengths), capacity=32), lengths, call["seed"])
    expected = host_model.run_stage(call["stage"], hidden, host, rows)
    for model in (writing_model, tiled):
        bound = filled(KVCache(cfg, rows=len(lengths), capacity=32), lengths, call["seed"])
        before = bound.keys.copy(), bound.values.copy()
        assert np.array_equal(model.run_stage(call["stage"], hidden, bound, rows), expected)
        for row, length in enumerate(lengths):
            # a row's own entries never change; entries beyond them are the host's where a row of the call has room
            assert np.array_equal(bound.keys[:, row, ..., :length], before[0][:, row, ..., :length])
            assert np.array_equal(bound.values[:, row, :, :length], before[1][:, row, :, :length])
            if row >= rows.start and length + T <= bound.capacity:
                assert np.array_equal(bound.keys[:, row], host.keys[:, row]), f"row {row}'s keys"
                assert np.array_equal(bound.values[:, row], host.values[:, row]), f"row {row}'s values"


def test_a_device_cache_on_the_cpu_provider_is_written_in_place_grows_keeping_its_entries_and_never_shrinks(models):
    host_model, writing_model = models
    cfg = host_model.config
    hidden = np.random.default_rng(0).standard_normal((2, 3, cfg.d_model)).astype(np.float32)
    host = KVCache(cfg, rows=2, capacity=16)
    device = DeviceKVCache(cfg, rows=2, capacity=16, device="cpu")
    host.lengths[:] = device.lengths[:] = [2, 5]
    assert np.array_equal(writing_model.run_stage(1, hidden, device, slice(0, 2)),
                          host_model.run_stage(1, hidden, host, slice(0, 2)))
    assert np.array_equal(device.keys, host.keys) and np.array_equal(device.values, host.values)
    device.resize(40)  # to a power of two, so a node's cache moves (and its decode ticks capture anew) rarely
    assert device.capacity == 64 and device.keys.shape[-1] == 64
    assert np.array_equal(device.keys[..., :16], host.keys) and not device.keys[..., 16:].any()
    memory = device.memory()
    device.resize(16)  # never smaller: it stays where its ticks were captured
    assert device.capacity == 64 and device.memory() == memory
    assert np.array_equal(device.keys[..., :16], host.keys)
    with pytest.raises(TypeError, match="written by the stage graphs"):
        device.write(slice(0, 1), [], [])


def test_decode_tiles_follow_a_cache_that_moves_when_it_grows(models, tiled):
    """A node's cache moves when a longer sequence opens: its ticks get a new tile, and compute what the host's
    path computes before and after."""
    host_model, _ = models
    cfg = host_model.config
    host, moved = KVCache(cfg, rows=3, capacity=16), KVCache(cfg, rows=3, capacity=16)
    rng = np.random.default_rng(3)
    for step in range(24):
        if step == 10:
            for cache in (host, moved):
                cache.resize(48)
        hidden = rng.standard_normal((2, 1, cfg.d_model)).astype(np.float32)
        rows = slice(step % 2, step % 2 + 2)
        assert np.array_equal(tiled.run_stage(step % 3, hidden, moved, rows),
                              host_model.run_stage(step % 3, hidden, host, rows)), f"step {step}"
        for cache in (host, moved):
            for row in range(rows.start, rows.stop):
                cache.advance(row, 1)


def test_greedy_classification_fetches_the_tokens_and_their_probabilities(models):
    host_model, resident_model = models
    hidden = np.random.default_rng(5).standard_normal((5, host_model.config.d_model)).astype(np.float32)
    logits, tokens = host_model.classify(hidden)
    resident_logits, resident_tokens = resident_model.classify(hidden)  # the derived head's are the bundle's
    assert np.array_equal(resident_logits, logits) and np.array_equal(resident_tokens, tokens)
    expected = [guess_probability(row, token, 0.0) for row, token in zip(logits, tokens)]
    scored = np.array([True, False, True, True, False])
    for model in models:
        greedy, probabilities = model.classify_greedy(hidden, scored)
        assert np.array_equal(greedy, tokens)
        np.testing.assert_allclose(probabilities[scored], np.array(expected)[scored], rtol=1e-5)


def test_drawn_rows_fetch_their_largest_logits_and_draw_the_hosts_tokens(models, monkeypatch):
    host_model, resident_model = models
    monkeypatch.setattr(draws, "TOP_FOR_TEMPERATURE", 16)  # of 4096: a draw without top_k is often undecided
    fetched = []
    classify_top = resident_model.classify_top

    def counting_classify_top(*args, **kwargs):
        top = classify_top(*args, **kwargs)
        return top._replace(fetch_all=lambda: fetched.append(1) or top.fetch_all())

    monkeypatch.setattr(resident_model, "classify_top", counting_classify_top)
    hidden = np.random.default_rng(6).standard_normal((5, host_model.config.d_model)).astype(np.float32) * 4
    by_top_k = [SamplingParams(), SamplingParams(temperature=0.8, top_k=5, seed=1), SamplingParams(),
                SamplingParams(temperature=0.5, top_k=40, top_p=0.8, seed=2), SamplingParams(temperature=1.3, top_k=2)]
    others = [SamplingParams(temperature=1.0, seed=3), SamplingParams(), SamplingParams(temperature=0.9, top_p=0.9),
              SamplingParams(temperature=0.3, seed=5), SamplingParams(temperature=0.7, top_k=9)]
    scored = np.array([True, True, False, True, True])
    for samplings, fetches in ((by_top_k, 0), (others, 1)):
        for position in range(0, 200, 10):
            fetched.clear()
            drawn = classify_rows(resident_model, hidden, samplings, [position] * 5, scored)
            expected = classify_rows(host_model, hidden, samplings, [position] * 5, scored)
            assert [token for token, _ in drawn] == [token for token, _ in expected]
            np.testing.assert_allclose([p for _, p in drawn], [p for _, p in expected], rtol=1e-5)
            assert len(fetched) == fetches  # every logit only where top-p alone needs them all


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, seed=4)],
                         ids=["greedy", "sampled"])
def test_speculative_decoding_on_caches_the_graphs_write_gives_the_plain_text(models, tiled, sampling, monkeypatch):
    host_model, writing_model = models
    tokenizer = load_bundle().tokenizer()
    prompts = [tokenizer.encode(text).ids for text in ("ROMEO. But soft, what light", "Enter a Messenger.",
                                                       "KING HENRY. Once more unto the breach, dear friends,")]
    kwargs = {"max_new_tokens": 40, "eos_id": -1, "sampling": sampling}
    plain = [generate_plain(host_model, prompt, **kwargs).token_ids for prompt in prompts]
    monkeypatch.setattr(tiled, "read_kept", None)  # what tiles keep on the device is never read back here
    for model in (writing_model, tiled):
        speculative = generate_speculative(model, prompts, **kwargs)
        assert [generation.token_ids for generation in speculative] == plain
        assert sum(g.stats.flushed_steps for g in speculative) > 0  # rollbacks happened, and lost nothing
    assert [generate_plain(tiled, prompt, **kwargs).token_ids for prompt in prompts] == plain


def test_a_decode_call_reads_its_inputs_where_they_are_and_keeps_its_outputs_on_the_device(models, tiled):
    """Each row's input from a kept state, a token looked up on the device, the host, or none (riding along): the
    outputs and cache entries the host's path gives for the same inputs, and rows outside the call keep theirs."""
    host_model = models[0]
    rng = np.random.default_rng(11)
    rows, d = 5, host_model.config.d_model
    kept_cache, host_cache = tiled.new_cache(rows=rows, capacity=32), host_model.new_cache(rows=rows, capacity=32)
    first = rng.standard_normal((rows, 1, d)).astype(np.float32)
    tiled.run_kept(0, kept_cache, slice(0, rows), np.full(rows, FROM_HIDDEN), np.zeros(rows, np.int64), first)
    expected_first = host_model.run_stage(0, first, host_cache, slice(0, rows))
    everything = KeptRows(kept_cache, tuple(range(rows)))
    assert np.array_equal(tiled.read_kept(everything), expected_first)
    for cache in (kept_cache, host_cache):
        cache.lengths[:] = 1
    sources, tokens = np.array([0, FROM_TOKEN, FROM_HIDDEN, RIDES]), np.array([0, 42, 0, 0])
    hidden = rng.standard_normal((4, 1, d)).astype(np.float32)
    tiled.run_kept(1, kept_cache, slice(1, rows), sources, tokens, hidden)
    inputs = np.stack([expected_first[0], host_model.embed(np.array([[42]]))[0], hidden[2], hidden[3]])
    expected = host_model.run_stage(1, inputs, host_cache, slice(1, rows))
    kept = tiled.read_kept(everything)
    assert np.array_equal(kept[1:4], expected[:3])
    assert np.array_equal(kept[[0, 4]], expected_first[[0, 4]])  # a row riding along keeps its state
    for cache in (kept_cache, host_cache):
        cache.lengths[1:4] += 1
    for row in range(1, 4):
        valid = int(kept_cache.lengths[row])
        assert np.array_equal(kept_cache.position_keys()[:, row, :, :valid], host_cache.position_keys()[:, row, :, :valid])
        assert np.array_equal(kept_cache.values[:, row, :, :valid], host_cache.values[:, row, :, :valid])


def test_stages_split_over_two_executors_hand_kept_states_on_as_the_host_gives_them(tiled):
    """A node hosting the first stage hands its decode items' states to the next node's: read back to the host once,
    they are what one executor hosting every stage keeps, and the predictions are the same."""
    stages = tiled.config.n_stages
    whole = TickExecutor(tiled, slots=1, capacity=16)
    first = TickExecutor(tiled, slots=1, capacity=16, stages=[0])
    rest = TickExecutor(tiled, slots=1, capacity=16, stages=range(1, stages))
    for executor in (whole, first, rest):
        executor.open(0)
    for start, tokens in ((0, (5, 6, 7, 8)), (4, (9,))):  # a prompt, then a decode item
        handed = {}
        for stage in range(stages):
            item = Item(0, start, len(tokens), stage, tokens if stage == 0 else None, final=stage == stages - 1)
            expected = whole.run(TickPlan([], [item], [])).predictions[(0, start)]
            out = (first if stage == 0 else rest).run(TickPlan([], [item], []), hidden_in=handed)
            assert out.predictions[(0, start)] == expected
            if stage == 0:
                handed = out.handoff
                assert handed[(0, start)].shape == (len(tokens), tiled.config.d_model)


def test_guesses_through_exit_maps_read_kept_states_on_the_host_and_speculation_keeps_the_plain_text(models, tiled,
                                                                                                    monkeypatch):
    rng = np.random.default_rng(2)
    d = tiled.config.d_model
    maps = {stage: ExitMap((rng.standard_normal((d, 4)) / np.sqrt(d)).astype(np.float32),
                           rng.standard_normal((4, d)).astype(np.float32), None) for stage in range(2)}
    monkeypatch.setattr(tiled, "exit_maps", maps)
    prompt = load_bundle().tokenizer().encode("Enter a Messenger.").ids
    kwargs = {"max_new_tokens": 24, "eos_id": -1}
    plain = generate_plain(models[0], prompt, **kwargs).token_ids
    (speculative,) = generate_speculative(tiled, [prompt], **kwargs)
    assert speculative.token_ids == plain


def test_a_tokens_time_counts_the_copies_between_host_and_device_where_the_graphs_run_bound(models, tiled):
    prompt = load_bundle().tokenizer().encode("ROMEO. But soft").ids
    spent = {name: time_per_token(lambda m=model: len(generate_plain(m, prompt, max_new_tokens=8, eos_id=-1).token_ids),
                                  runs=1) for name, model in (("host", models[0]), ("tiled", tiled))}
    assert spent["host"]["onnx_runtime_calls"]["copies"] == 0  # the host's arrays are ONNX Runtime's inputs
    assert spent["tiled"]["onnx_runtime_calls"]["copies"] > 0  # a tile's buffers are filled and read
    for name in spent:
        assert spent[name]["onnx_runtime_calls"]["runs"] == 4  # three stages and the classifier a token
        assert spent[name]["ms"] >= spent[name]["onnx_runtime_ms"]["runs"] * 0.5 > 0


@pytest.mark.training  # it quantizes the demo bundle
def test_a_bundle_that_computes_one_row_apart_gives_the_host_s_text_on_written_caches(tmp_path):
    """int4 weights with float32 arithmetic compute a single row apart: the graphs writing their caches pair a lone
    row's products as the host's do, and the text is the same."""
    bundle = load_bundle(quantize_bundle(DEFAULT_BUNDLE, tmp_path / "int4", Quantization("int4", accuracy_level=1)))
    host_model = OnnxStageModel(bundle, threads=1, fused_attention=False)
    writing_model = OnnxStageModel(bundle, threads=1, device_resident=True)
    prompts = [bundle.tokenizer().encode(text).ids for text in ("ROMEO. But soft", "Enter a Messenger.")]
    kwargs = {"max_new_tokens": 32, "eos_id": -1}
    for prompt, generation in zip(prompts, generate_speculative(writing_model, prompts, **kwargs)):
        assert generation.token_ids == generate_plain(host_model, prompt, **kwargs).token_ids

"""Speculative decoding of the demo model gives exactly the plain decoder's tokens."""

import json

import pytest

from runtime.core.bundle import load_bundle
from runtime.core.sampling import SamplingParams
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain
from runtime.local.speculative import generate_speculative
from runtime.models.corpus import load_shakespeare
from tests.conftest import assert_one_line_error, run_speed

pytestmark = pytest.mark.decoding  # decodes many prompts with the shipped model


def held_out_prompts(count: int) -> list[str]:
    """Distinct lines of the held-out works: text the model has never been trained on."""
    lines = [line.strip() for text in load_shakespeare().held_out for line in text.splitlines()]
    lines = sorted({line for line in lines if 25 <= len(line) <= 70})
    return lines[:: len(lines) // count][:count]


@pytest.fixture(scope="module")
def demo():
    bundle = load_bundle()
    return bundle, open_stage_model(bundle, threads=1)


@pytest.fixture(scope="module")
def prompt_ids(demo):
    tokenizer = demo[0].tokenizer()
    return [tokenizer.encode(p).ids for p in held_out_prompts(50)]


@pytest.mark.parametrize(
    ("sampling", "prompts"),
    [(SamplingParams(), 50), (SamplingParams(temperature=0.8, seed=1), 16),
     (SamplingParams(temperature=1.0, top_k=20, seed=2), 16), (SamplingParams(temperature=0.7, top_p=0.9, seed=3), 16)],
    ids=["greedy", "t0.8", "top-k", "top-p"],
)
def test_speculative_equals_sequential_on_many_prompts(demo, prompt_ids, sampling, prompts):
    """Held-out prompts decoded together, with and without speculation: the same tokens."""
    bundle, model = demo
    prompt_ids = prompt_ids[:prompts]
    kwargs = {"max_new_tokens": 64, "eos_id": bundle.eos_token_id, "sampling": sampling}
    speculative = generate_speculative(model, prompt_ids, **kwargs)
    sequential = generate_speculative(model, prompt_ids, speculate=False, **kwargs)
    for spec, seq in zip(speculative, sequential):
        assert spec.token_ids == seq.token_ids
        assert spec.stop_reason == seq.stop_reason
    assert sum(s.stats.ticks for s in speculative) < sum(s.stats.ticks for s in sequential)


def test_sampled_guesses_flip_about_as_rarely_as_greedy_ones(demo, prompt_ids):
    """Early stages guess with the draw the last stage will make (same random numbers, their own
    distribution), so sampling at 0.8 speculates nearly as well as greedy decoding (argmax guesses of a
    sampled text flipped 58% at the last boundary)."""
    bundle, model = demo
    flips = {}
    for name, sampling in [("greedy", SamplingParams()), ("sampled", SamplingParams(temperature=0.8, seed=7))]:
        generations = generate_speculative(model, prompt_ids[:12], max_new_tokens=64, eos_id=-1, sampling=sampling)
        flips[name] = [sum(g.stats.flips_per_boundary[b] for g in generations) / len(generations) for b in (0, 1)]
    assert flips["sampled"][1] < 2 * flips["greedy"][1] + 0.05, flips
    assert flips["sampled"][0] < 2 * flips["greedy"][0] + 0.05, flips


def test_batched_greedy_equals_the_plain_reference(demo, prompt_ids):
    bundle, model = demo
    speculative = generate_speculative(model, prompt_ids, max_new_tokens=64, eos_id=bundle.eos_token_id)
    for ids, spec in zip(prompt_ids, speculative):
        assert spec.token_ids == generate_plain(model, ids, max_new_tokens=64, eos_id=bundle.eos_token_id).token_ids


@pytest.mark.parametrize("seed", [5, 6])
def test_one_sampled_sequence_equals_the_plain_reference(demo, prompt_ids, seed):
    bundle, model = demo
    sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
    for ids in prompt_ids[:12]:
        (spec,) = generate_speculative(model, [ids], max_new_tokens=64, eos_id=bundle.eos_token_id, sampling=sampling)
        plain = generate_plain(model, ids, max_new_tokens=64, eos_id=bundle.eos_token_id, sampling=sampling)
        assert spec.token_ids == plain.token_ids


def test_one_sequence_alone_equals_plain_and_speculates(demo, prompt_ids):
    bundle, model = demo
    (spec,) = generate_speculative(model, [prompt_ids[0]], max_new_tokens=64, eos_id=-1)
    plain = generate_plain(model, prompt_ids[0], max_new_tokens=64, eos_id=-1)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.committed == 64
    assert spec.stats.mean_in_flight > 1.5
    assert spec.stats.ticks < 3 * 64


def test_reference_speculate_prints_stats():
    result = run_speed("reference", "--speculate", "--json", "--max-new-tokens", "16", "ROMEO:")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    plain = json.loads(run_speed("reference", "--json", "--max-new-tokens", "16", "ROMEO:").stdout)
    assert out["token_ids"] == plain["token_ids"]
    assert set(out["stats"]) == {"ticks", "committed", "flips_per_boundary", "flushed_steps", "mean_in_flight",
                                 "held_guesses"}
    assert len(out["stats"]["flips_per_boundary"]) == 2


@pytest.mark.parametrize(
    ("flag", "message"),
    [("--temperature=-1", "--temperature: must be at least 0"), ("--top-p=0", "--top-p: must be above 0 and at most 1"),
     ("--top-p=1.5", "--top-p: must be above 0 and at most 1"), ("--top-k=-2", "--top-k: must be at least 0"),
     ("--seed=1.5", "--seed")],
)
def test_bad_sampling_parameters_decode_nothing(flag, message):
    assert_one_line_error(run_speed("reference", "--speculate", flag, "ROMEO:"), message)


def test_a_stop_string_ends_both_decoders_at_the_same_token():
    outputs = [json.loads(run_speed("reference", *flags, "--json", "--stop", ".", "--max-new-tokens", "40", "ROMEO:").stdout)
               for flags in ([], ["--speculate"])]
    assert outputs[0]["token_ids"] == outputs[1]["token_ids"]
    for out in outputs:
        assert out["stop_reason"] == "stop"
        assert "." not in out["text"]
        assert len(out["token_ids"]) < 40


class PassRecorder:
    """A stage model that notes how many positions each pass of stage 0 runs."""

    def __init__(self, model):
        self.model, self.passes = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def run_stage(self, stage, hidden, cache, rows):
        if stage == 0:
            self.passes.append(hidden.shape[1])
        return self.model.run_stage(stage, hidden, cache, rows)


def test_plain_decoding_runs_a_long_prompt_in_chunks_as_the_pipeline_does(demo, prompt_ids):
    """The kernels give a position other bits in a pass of several positions than in another grouping, so
    plain decoding groups the prompt as every pipeline does, and the same long prompt gives the same text."""
    bundle, model = demo
    long_prompt = sum(prompt_ids[:30], [])[:150]
    recorder = PassRecorder(model)
    plain = generate_plain(recorder, long_prompt, max_new_tokens=8, eos_id=-1, prefill_chunk=64)
    assert recorder.passes == [64, 64, 22] + [1] * 7
    (spec,) = generate_speculative(model, [long_prompt], max_new_tokens=8, eos_id=-1, prefill_chunk=64)
    assert spec.token_ids == plain.token_ids

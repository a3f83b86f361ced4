"""The local tick executor: protocol checks and cache bookkeeping on a real ONNX Runtime session."""

import numpy as np
import pytest

from runtime.core.bundle import ExitMap, load_bundle
from runtime.core.errors import SpeedError
from runtime.core.scheduler import Item, TickPlan, Truncate
from runtime.executor.kv_cache import CAPACITY_TILE, KVCache
from runtime.executor.onnx_stage_model import OnnxStageModel
from runtime.executor.tick_executor import TickExecutor
from runtime.local.speculative import generate_speculative


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return OnnxStageModel(load_bundle(tiny_bundle), threads=1)


def test_an_item_that_does_not_start_at_its_cache_end_is_refused(model):
    executor = TickExecutor(model, slots=1, capacity=16)
    executor.open(7)
    stray = Item(seq_id=7, start=3, length=1, stage=0, tokens=(5,), final=False)
    with pytest.raises(SpeedError, match="cache holds 0 positions but the item starts at 3"):
        executor.run(TickPlan([], [stray], []))


def test_items_append_their_entries_and_truncations_roll_them_back(model):
    executor = TickExecutor(model, slots=2, capacity=16)
    executor.open(0)
    executor.open(1)
    prompt = Item(seq_id=1, start=0, length=4, stage=0, tokens=(5, 6, 7, 8), final=False)
    result = executor.run(TickPlan([], [prompt], []))
    assert set(result.predictions) == {(1, 0)}
    row = 1 * 3 + 0  # slot-major: slot 1, stage 0
    assert executor.cache.lengths.tolist() == [0, 0, 0, 4, 0, 0]
    executor.run(TickPlan([Truncate(1, 0, 2)], [], []))
    assert executor.cache.lengths[row] == 2


def test_a_closed_sequences_rows_hold_nothing_while_others_decode(model):
    executor = TickExecutor(model, slots=2, capacity=16)
    executor.open(0)
    executor.open(1)
    prompts = [Item(seq_id=seq, start=0, length=4, stage=0, tokens=(5, 6, 7, 8), final=False) for seq in (0, 1)]
    executor.run(TickPlan([], prompts, []))
    executor.close(0)
    assert executor.cache.lengths.tolist() == [0, 0, 0, 4, 0, 0]


def test_the_cache_refuses_to_grow_past_its_capacity(tiny_bundle):
    cfg = load_bundle(tiny_bundle).config
    cache = KVCache(cfg, rows=1, capacity=2)  # room for a whole tile of positions
    assert cache.capacity == CAPACITY_TILE
    more = CAPACITY_TILE + 1
    with pytest.raises(SpeedError, match=f"needs {more} positions but its cache holds {CAPACITY_TILE}"):
        cache.advance(0, more)
    assert cache.lengths[0] == 0
    with pytest.raises(SpeedError, match="cannot truncate"):
        cache.truncate(0, 1)


def test_a_node_hosting_later_stages_takes_hidden_states_in_and_hands_them_on(model):
    """Stages split over two executors give the same predictions as one executor hosting all."""
    cfg = model.config
    whole = TickExecutor(model, slots=1, capacity=16)
    first = TickExecutor(model, slots=1, capacity=16, stages=[0])
    rest = TickExecutor(model, slots=1, capacity=16, stages=range(1, cfg.n_stages))
    for executor in (whole, first, rest):
        executor.open(0)
    tokens = (5, 6, 7, 8)
    expected = {}
    for stage in range(cfg.n_stages):
        item = Item(0, 0, len(tokens), stage, tokens if stage == 0 else None, final=stage == cfg.n_stages - 1)
        expected[stage] = whole.run(TickPlan([], [item], [])).predictions[(0, 0)]
    item = Item(0, 0, len(tokens), 0, tokens, final=False)
    out = first.run(TickPlan([], [item], []))
    assert out.predictions[(0, 0)] == expected[0]
    handed = out.handoff
    assert handed[(0, 0)].shape == (len(tokens), cfg.d_model)
    for stage in range(1, cfg.n_stages):
        item = Item(0, 0, len(tokens), stage, None, final=stage == cfg.n_stages - 1)
        out = rest.run(TickPlan([], [item], []), hidden_in=handed)
        assert out.predictions[(0, 0)] == expected[stage]
        assert out.handoff == {}  # the next stage is hosted by the same executor, or there is none


def test_a_cache_keeps_its_entries_when_it_grows(tiny_bundle):
    cfg = load_bundle(tiny_bundle).config
    cache = KVCache(cfg, rows=2, capacity=4)
    cache.keys[...] = 1.0
    cache.lengths[:] = [3, 4]
    cache.resize(CAPACITY_TILE + 1)  # a whole number of tiles
    grown = 2 * CAPACITY_TILE
    assert cache.capacity == cache.keys.shape[-1] == cache.values.shape[-2] == grown
    assert (cache.keys[..., :CAPACITY_TILE] == 1.0).all() and (cache.keys[..., CAPACITY_TILE:] == 0.0).all()
    assert cache.lengths.tolist() == [3, 4]


# --- exit maps: what an early stage's guess reads --------------------------------------------------

ADAPTER_RANK = 4


def random_adapters(cfg, seed: int = 0) -> dict[int, ExitMap]:
    """Low-rank exits (A (d, r), B (r, d)) after every early stage, as `speed train-exit --kind low-rank` writes
    them, but random: large enough that h + (h @ A) @ B is far from h."""
    rng = np.random.default_rng(seed)
    d = cfg.d_model
    return {stage: ExitMap((rng.standard_normal((d, ADAPTER_RANK)) / np.sqrt(d)).astype(np.float32),
                           rng.standard_normal((ADAPTER_RANK, d)).astype(np.float32), None)
            for stage in range(cfg.n_stages - 1)}


def adapted(hidden: np.ndarray, adapter: ExitMap) -> np.ndarray:
    return hidden + (hidden @ adapter.down) @ adapter.up


class HeadLog:
    """Wraps a model's run_stage and its classifier calls: for every one, the hidden states at the last position
    of every row that the stage calls since the previous one gave, and the hidden states the head was given."""

    def __init__(self, model):
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []  # (stage outputs of the tick, head input)
        self._outputs: list[np.ndarray] = []
        run_stage, classify, classify_greedy = model.run_stage, model.classify, model.classify_greedy

        def logged_run_stage(stage, hidden, cache, rows):
            out = run_stage(stage, hidden, cache, rows)
            self._outputs.extend(out[:, -1].copy())
            return out

        def logged(head):
            def call(hidden, *arguments, **options):
                self.calls.append((np.array(self._outputs), np.array(hidden)))
                self._outputs = []
                return head(hidden, *arguments, **options)
            return call

        model.run_stage, model.classify, model.classify_greedy = logged_run_stage, logged(classify), logged(classify_greedy)


@pytest.fixture
def demo_with_adapters():
    """The shipped demo model given random low-rank exits (a bundle has trained ones only after `speed train-exit`)."""
    model = OnnxStageModel(load_bundle(), threads=1)
    model.exit_maps = random_adapters(model.config)
    return model


def test_an_early_guess_reads_the_head_through_its_adapter_unless_the_sequence_asked_for_plain_guesses(
        demo_with_adapters):
    model = demo_with_adapters
    adapters, last = model.exit_maps, model.config.n_stages - 1
    log = HeadLog(model)
    executor = TickExecutor(model, slots=2, capacity=16)
    executor.open(0)
    executor.open(1, plain_guesses=True)
    prompts = {0: (5, 6, 7, 8), 1: (9, 10, 11, 12)}
    for stage in range(last + 1):  # one stage a tick: each tick's head reads what that stage gave
        items = [Item(seq_id, 0, 4, stage, tokens if stage == 0 else None, final=stage == last)
                 for seq_id, tokens in prompts.items()]
        executor.run(TickPlan([], items, []))
        outputs, head_input = log.calls[-1]
        first_row = min(executor.row(seq_id, stage) for seq_id in prompts)
        plain = {seq_id: outputs[executor.row(seq_id, stage) - first_row] for seq_id in prompts}
        assert len(head_input) == 2  # the items in plan order: sequence 0, then 1
        if stage < last:
            guess = adapted(plain[0], adapters[stage])
            assert not np.allclose(guess, plain[0], atol=1e-2)  # the adapter changes what the head reads
            np.testing.assert_allclose(head_input[0], guess, rtol=0, atol=1e-5, err_msg=f"stage {stage}: adapted")
        else:  # a committed token never reads an adapter
            np.testing.assert_allclose(head_input[0], plain[0], rtol=0, atol=0, err_msg="last stage")
        np.testing.assert_allclose(head_input[1], plain[1], rtol=0, atol=0, err_msg=f"stage {stage}: plain guesses")


def head_reads(log: HeadLog, adapters: dict[int, ExitMap]) -> dict[str, int]:
    """How many hidden states the head read as a stage gave them, and how many through an exit map."""
    counts = {"plain": 0, "adapted": 0}
    for outputs, head_input in log.calls:
        for row in head_input:
            if any(np.array_equal(row, h) for h in outputs):
                counts["plain"] += 1
            elif any(np.allclose(row, adapted(h, a), rtol=0, atol=1e-5) for h in outputs for a in adapters.values()):
                counts["adapted"] += 1
            else:
                raise AssertionError("the head read a hidden state that no stage gave, adapted or not")
    return counts


def test_speculative_decoding_guesses_through_the_adapters_and_plain_guesses_turns_them_off(demo_with_adapters):
    model = demo_with_adapters
    prompt = load_bundle().tokenizer().encode("ROMEO. But soft, what light").ids
    log = HeadLog(model)
    reads, tokens = {}, {}
    for plain_guesses in (False, True):
        log.calls.clear()
        [generation] = generate_speculative(model, [prompt], max_new_tokens=12, eos_id=-1, plain_guesses=plain_guesses)
        reads[plain_guesses], tokens[plain_guesses] = head_reads(log, model.exit_maps), generation.token_ids
    assert reads[False]["adapted"] > 0 and reads[False]["plain"] > 0  # guesses adapted, committed tokens not
    assert reads[True] == {"plain": reads[True]["plain"], "adapted": 0}
    assert tokens[False] == tokens[True]  # guesses change, the text does not

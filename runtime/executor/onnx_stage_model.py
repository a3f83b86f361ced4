"""Run a bundle's graphs with ONNX Runtime: embedding lookup, stages and the shared classifier."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.core.bundle import Bundle
from runtime.executor.cache_writing import WRITES
from runtime.executor.decode_tiles import UNCAPTURED, DecodeTiles, tiles_by_default
from runtime.executor.device_cache import CacheBinding, DeviceKVCache
from runtime.executor.kept_logits import INVERSE_TEMPERATURE, TEMPERED_TOTAL, TOP_COUNT, TOP_LOGITS, TOP_TOKENS
from runtime.executor.kept_states import EMBEDDING, FROM_HIDDEN, KEPT_STATES, ROW_PLAN, STATE_ROWS, STATES
from runtime.executor.kv_cache import KVCache
from runtime.executor.onnx_session import PROVIDERS, LazySession, create_session
from runtime.executor.row_kernels import products_computing_one_row_apart
from runtime.executor.stage_model import KeptRows, TopLogits, top_probabilities

log = logging.getLogger("speed.node")

KEPT_BINDINGS = 256  # (session, span of rows, cache memory) bindings kept for the next call
LOGITS, TOKENS = 0, 1  # a head's outputs, by position


@functools.cache  # asked for on every stage call of the host's path
def stage_outputs(layers: int) -> list[str]:
    return ["hidden_out", *(f"new_key_{l}" for l in range(layers)), *(f"new_value_{l}" for l in range(layers))]


class OnnxStageModel:
    """One session per distinct stage graph: stages that share weights share a session. Only the graphs
    of `stages` are loaded (default all), so a node holds in memory just what it may run.

    device_resident: state stays where the graphs run. The stage and exit graphs write their new cache
    entries themselves, into caches bound by address (runtime.executor.cache_writing), instead of returning
    them for the host to write, and classification fetches greedy tokens and their probabilities, or each row's
    largest logits, not every logit (runtime.executor.kept_logits). The default on a GPU, where the caches then
    stay on the device (DeviceKVCache); on the CPU the host's path is faster (the graphs' writes cost SmolLM2
    0.6 ms a token there, docs/performance.md), so it runs there only to check the GPU's path where there is no GPU.

    fused_attention (default): on the CPU, graphs exported with the fused rotary embedding run each layer's
    attention as ONNX Runtime's one fused operator, which writes the cache in place
    (runtime.executor.fused_attention). Their caches hold keys by position (KVCache).

    decode_tiles (default on CUDA, with device_resident): a decode tick runs over every row of its cache through
    buffers bound once, which ONNX Runtime captures as a CUDA graph and replays (runtime.executor.decode_tiles), and
    its hidden states stay on the device for the next stage's call and the classifiers (keeps_states,
    runtime.executor.kept_states)."""

    def __init__(self, bundle: Bundle, *, device: str = "cpu", threads: int = 0, stages: Iterable[int] | None = None,
                 device_resident: bool | None = None, fused_attention: bool = True, decode_tiles: bool | None = None):
        self.config = bundle.config
        self.device = device
        self.device_resident = device != "cpu" if device_resident is None else device_resident
        self._graph_ids = bundle.graph_ids
        # products that compute a single row with another kernel are given two rows where a call has one, so that a
        # token's result never depends on what it is batched with, which lossless speculation needs. (Sessions of the
        # graphs without pairing, for calls of several rows, gave no gain measured in decoding and packed the weights
        # again: 35 MB a stage of SmolLM2.)
        paired = products_computing_one_row_apart(bundle, device)

        # decode ticks as fixed tiles, which a GPU replays as CUDA graphs (default on CUDA); on the CPU only tests
        # ask for them, to run their every line
        tiles = tiles_by_default(device) if decode_tiles is None else decode_tiles
        tiles = tiles and self.device_resident

        def session(path: Path, derived: str | None, *, graph_capture: bool = False):
            return create_session(path, device=device, threads=threads, sha256=bundle.file_sha256(path),
                                  derived=derived, paired=paired, graph_capture=graph_capture)

        graphs = bundle.stage_graphs
        self.stages = frozenset(range(len(graphs)) if stages is None else stages)  # the stages it can run
        exit_graphs = {stage: path for stage, path in bundle.exit_layer_graphs().items() if stage in self.stages}
        cached = {graphs[stage] for stage in self.stages} | set(exit_graphs.values())  # the graphs taking a cache
        sessions = None
        self.fused_attention = fused_attention and device == "cpu" and not self.device_resident
        if self.fused_attention:
            try:
                sessions = {path: session(path, "attention") for path in cached}
            except ValueError as exc:  # an older export: its attention has another pattern
                log.info("%s runs its own attention operators, as exported before the fused rotary embedding (%s); "
                         "`speed export %s OUT_DIR` exports its graphs again, with fused attention on a CPU",
                         bundle.manifest["name"], exc, bundle.path)
                self.fused_attention = False
        if sessions is None:
            sessions = {path: session(path, "writes" if self.device_resident else None,
                                      graph_capture=tiles) for path in cached}
        self._stage_sessions = {stage: sessions[graphs[stage]] for stage in self.stages}
        head_form, guess_head = ("kept-logits" if self.device_resident else None), bundle.guess_head_graph
        # the classifiers are opened at their first use: a node whose gate holds every guess never holds the guess
        # head, and one that does not run the last stage gives the head back (release_classifiers)
        self._head = LazySession(lambda: session(bundle.head_graph, head_form))
        self._guess_head = LazySession(lambda: session(guess_head, head_form)) if guess_head is not None else self._head
        self.provider = (next(iter(sessions.values())) if sessions else self._head.get()).get_providers()[0]
        self.guess_vocabulary = bundle.guess_vocabulary()
        self._embedding = bundle.embedding()
        self.exit_maps = bundle.exit_maps()
        self._exit_sessions = {stage: sessions[path] for stage, path in exit_graphs.items()}
        self.exit_layer_stages = frozenset(self._exit_sessions)
        self._layers = [len(self.config.stage_layers(s)) for s in range(self.config.n_stages)]
        self._bindings: dict[tuple, ort.IOBinding] = {}
        self._tiles = None
        if self.device_resident:  # what the derived graphs read on the device (runtime.executor.kept_states)
            d = self.config.d_model
            on_device = functools.partial(ort.OrtValue.ortvalue_from_numpy, device_type=device, device_id=0)
            self._no_states = on_device(np.zeros((1, 1, d), np.float32))  # where every input is the host's
            self._no_hidden = on_device(np.zeros((1, d), np.float32))  # for a classifier reading only kept states
            # the whole table only where tokens are looked up (every form of it gives float32 rows)
            table = self._embedding[np.arange(self.config.vocab_size)] if 0 in self.stages else np.zeros((1, d))
            self._device_embedding = on_device(np.ascontiguousarray(table, np.float32))
            if tiles:
                self._tiles = DecodeTiles(device, d, self._device_embedding)
        self.keeps_states = self._tiles is not None  # decode calls leave their hidden states on the device

    def new_cache(self, *, rows: int, capacity: int, layers: int | None = None) -> KVCache:
        """A cache for these graphs: on the device when they write it there."""
        if self.device_resident and self.device != "cpu":
            return DeviceKVCache(self.config, rows=rows, capacity=capacity, layers=layers, device=self.device)
        return KVCache(self.config, rows=rows, capacity=capacity, layers=layers, keys_by_position=self.fused_attention)

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """(B, T) int64 -> (B, T, d) float32."""
        return self._embedding[token_ids]

    def graph_of(self, stage: int) -> int:
        """Stages with the same graph id share weights and can run in one call."""
        return self._graph_ids[stage]

    def run_stage(self, stage: int, hidden: np.ndarray, cache: KVCache, rows: slice) -> np.ndarray:
        """hidden (B, T, d) of the tokens after each row's cache length, B = rows of `rows` -> hidden (B, T, d).
        Each row's new keys and values are written at its length, as far as it has room (KVCache.write);
        the caller advances the lengths of the rows it keeps."""
        return self._run(self._stage_sessions[stage], self._layers[stage], hidden, cache, rows)

    def run_exit_layer(self, stage: int, hidden: np.ndarray, cache: KVCache, rows: slice) -> np.ndarray:
        """The stage's one-layer exit: a stage graph of one layer over its own cache (one layer per row)."""
        return self._run(self._exit_sessions[stage], 1, hidden, cache, rows)

    def run_kept(self, stage: int, cache: KVCache, rows: slice, sources: np.ndarray, tokens: np.ndarray,
                 hidden: np.ndarray | None) -> None:
        """One new token a row of `rows`, each row's input where sources (B,) says (runtime.executor.kept_states): a
        kept state of the cache, the embedding of tokens[i] (B,), or hidden[i] (B, 1, d); their outputs stay on the
        device as the kept states of these rows."""
        self._tiles.run(self._stage_sessions[stage], self._layers[stage], cache, rows, sources, tokens, hidden)

    def read_kept(self, kept: KeptRows) -> np.ndarray:
        """(len(kept.rows), 1, d): these kept states on the host."""
        return self._tiles.read(kept.cache, list(kept.rows))

    def _run(self, session, layers: int, hidden: np.ndarray, cache: KVCache, rows: slice) -> np.ndarray:
        if self.fused_attention and hidden.shape[1] > 1:
            return self._run_rows_apart(session, layers, hidden, cache, rows)
        if self._tiles is not None and hidden.shape[1] == 1:
            rows_in_call = hidden.shape[0]
            self._tiles.run(session, layers, cache, rows, np.full(rows_in_call, FROM_HIDDEN),
                            np.zeros(rows_in_call, np.int64), hidden)
            return self._tiles.read(cache, rows)
        if not (self.device_resident or self.fused_attention):
            feeds = cache.feeds(rows, layers)
            # a row riding along near or at the model's context computes at the rotary tables' last positions
            # instead of past them (its result and its entries beyond its room are never read)
            feeds["cache_length"] = np.minimum(feeds["cache_length"], self.config.context_length - hidden.shape[1])
            out = session.run(stage_outputs(layers), {"hidden": hidden, **feeds})
            cache.write(rows, out[1 : 1 + layers], out[1 + layers :])
            return out[0]
        return self._run_bound(session, layers, hidden, cache, rows)

    def _run_rows_apart(self, session, layers: int, hidden: np.ndarray, cache: KVCache, rows: slice) -> np.ndarray:
        """Several new tokens a row, one call a row: ONNX Runtime's fused attention takes more than one new token
        after a cache for a single row only. Rows riding along are left out (each row's output is its own
        anyway); their output, never read, stays zero."""
        out = np.zeros_like(hidden)
        for i, row in enumerate(range(rows.start, rows.stop)):
            if cache.lengths[row] + hidden.shape[1] <= cache.capacity:  # a row with an item always has room
                out[i : i + 1] = self._run_bound(session, layers, hidden[i : i + 1], cache, slice(row, row + 1))
        return out

    def _run_bound(self, session, layers: int, hidden: np.ndarray, cache: KVCache, rows: slice) -> np.ndarray:
        """Run a graph that writes its own cache entries, the cache bound by address."""
        binding = self._binding(session, layers, cache, rows)
        out = np.empty(hidden.shape, np.float32)
        # into an array of this call's shape: reading the bound outputs back wraps every cache output too
        binding.bind_output("hidden_out", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        binding.bind_cpu_input("hidden", np.ascontiguousarray(hidden))
        if self.device_resident:  # its graphs read kept states, here none, and keep none
            plan = np.zeros((3, hidden.shape[0]), np.int64)
            plan[0], plan[1] = cache.lengths[rows], FROM_HIDDEN
            binding.bind_cpu_input(ROW_PLAN, plan)
            binding.bind_output(KEPT_STATES, self.device)  # of this call's shape, left to ONNX Runtime
        else:
            binding.bind_cpu_input("cache_length", cache.lengths[rows])
        session.run_with_iobinding(binding, UNCAPTURED)  # a session capturing decode tiles needs every call named
        return out

    def _binding(self, session, layers: int, cache: KVCache, rows: slice) -> ort.IOBinding:
        """The call's binding, its cache rows bound once per span of a cache's memory: binding costs about 10 us
        a tensor, most of a small stage's call."""
        memory = cache.memory()
        key = (id(session), rows.start, rows.stop, memory)
        binding = self._bindings.get(key)
        if binding is None:
            if len(self._bindings) >= KEPT_BINDINGS:
                self._bindings.clear()
            binding = session.io_binding()
            CacheBinding(memory).bind(binding, rows, layers, WRITES)
            if self.device_resident:
                binding.bind_ortvalue_input(STATES, self._no_states)
                binding.bind_ortvalue_input(EMBEDDING, self._device_embedding)
            self._bindings[key] = binding
        return binding

    def classify(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """hidden (N, d) -> logits (N, V), greedy tokens (N,)."""
        return self._classify(self._head, hidden)

    def classify_guesses(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """hidden (N, d) -> logits (N, K) over guess_vocabulary (all V tokens when it is None), greedy
        indices into it (N,)."""
        return self._classify(self._guess_head, hidden)

    def classify_greedy(self, hidden: np.ndarray | KeptRows, scored: np.ndarray, *, guesses: bool = False
                        ) -> tuple[np.ndarray, np.ndarray]:
        """hidden (N, d) -> greedy tokens (with guesses: indices into guess_vocabulary) (N,) and their probabilities
        (N,): every row's where the graphs keep the logits, only the `scored` rows' on the host."""
        head = self._guess_head if guesses else self._head
        if not self.keeps_logits:
            logits, tokens = self._classify(head, hidden)
            return tokens, top_probabilities(logits, scored)
        tokens, totals = (value.numpy() for value in self._run_kept_head(
            head, hidden, np.ones(len(hidden), np.float32), 1, [TOKENS, TEMPERED_TOTAL]))
        return tokens, 1 / totals

    @property
    def keeps_logits(self) -> bool:
        """Whether the logits stay where the head computed them (device_resident): a draw then asks classify_top."""
        return self.device_resident

    def classify_top(self, hidden: np.ndarray | KeptRows, inverse_temperature: np.ndarray, count: int, *,
                     guesses: bool = False) -> TopLogits:
        """hidden (N, d), inverse_temperature (N,) -> each row's `count` largest logits and what else its draw needs
        (TopLogits); every logit stays where it was computed until asked for. Only where the graphs keep the logits."""
        head = self._guess_head if guesses else self._head
        logits, *fetched = self._run_kept_head(head, hidden, inverse_temperature, count,
                                               [TOKENS, TEMPERED_TOTAL, TOP_LOGITS, TOP_TOKENS], keep_logits=True)
        tokens, totals, top_logits, top_tokens = (value.numpy() for value in fetched)
        return TopLogits(top_logits, top_tokens, totals, tokens, logits.shape()[-1], logits.numpy)

    def _run_kept_head(self, head: LazySession, hidden: np.ndarray | KeptRows, inverse_temperature: np.ndarray,
                       count: int, fetched: list[str | int], *, keep_logits: bool = False) -> list[ort.OrtValue]:
        """A head keeping its logits (runtime.executor.kept_logits) over rows given by the host or kept on the device:
        its outputs `fetched` (names, or LOGITS and TOKENS) on the host, after its logits left on the device where
        keep_logits."""
        session = head.get()
        binding = session.io_binding()
        feeds = self._kept_feeds(inverse_temperature, count)
        if isinstance(hidden, KeptRows):
            feeds[STATE_ROWS] = np.array(hidden.rows, np.int64)
            binding.bind_ortvalue_input(STATES, self._tiles.states(hidden.cache))
            if hidden.given is None:
                binding.bind_ortvalue_input("hidden", self._no_hidden)  # read by no row
            else:
                feeds["hidden"] = hidden.given
        else:
            feeds |= {STATE_ROWS: np.full(len(hidden), FROM_HIDDEN), "hidden": hidden}
            binding.bind_ortvalue_input(STATES, self._no_states)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        if keep_logits:
            binding.bind_output(head.outputs[LOGITS], self.device)
        for name in fetched:
            binding.bind_output(head.outputs[name] if isinstance(name, int) else name, "cpu")
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    @staticmethod
    def _kept_feeds(inverse_temperature: np.ndarray, count: int) -> dict[str, np.ndarray]:
        return {INVERSE_TEMPERATURE: inverse_temperature.astype(np.float32).reshape(-1, 1),
                TOP_COUNT: np.array([count], np.int64)}

    @property
    def cuda_graphs(self) -> bool:
        """Whether its decode ticks are replayed as CUDA graphs: tiles, on sessions ONNX Runtime let capture."""
        return self._tiles is not None and all(
            session.get_provider_options().get(PROVIDERS["cuda"], {}).get("enable_cuda_graph") == "1"
            for session in self._stage_sessions.values())

    @property
    def classifier_open(self) -> bool:
        return self._head.is_open

    def release_classifiers(self) -> None:
        """Give the classifiers' memory back until the next classification (a node not running the last stage
        classifies only for guesses, which its gate may hold back)."""
        self._head.release()
        self._guess_head.release()

    def _classify(self, head: LazySession, hidden: np.ndarray) -> list[np.ndarray]:
        """The head's logits and tokens for these rows."""
        if self.keeps_logits:
            return [value.numpy() for value in self._run_kept_head(head, hidden, np.ones(len(hidden), np.float32), 1,
                                                                   [LOGITS, TOKENS])]
        return head.get().run(head.outputs[:2], {"hidden": hidden})

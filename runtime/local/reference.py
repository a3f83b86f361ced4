"""Decoding in this process, plain or speculative: what `speed reference` and `speed chat --bundle` run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from runtime.core.bundle import load_bundle
from runtime.core.chat import ChatMessage
from runtime.core.errors import SpeedError
from runtime.core.generation import GenerationOptions, GenerationResult, guess_thresholds
from runtime.core.grouping import PREFILL_CHUNK
from runtime.core.limits import check_request
from runtime.core.stopping import StopStrings
from runtime.core.text_stream import TextStream
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain
from runtime.local.speculative import generate_speculative


class LocalDecoder:
    """A bundle opened in this process. Every request is checked before the model is first opened, so bad
    input fails before anything heavy is loaded; the model then stays open for the next request."""

    def __init__(self, bundle_path: Path | None = None, *, backend: str = "onnx", device: str = "cpu",
                 threads: int = 1, prefill_chunk: int = PREFILL_CHUNK):
        """prefill_chunk: prompt positions per pass, as the cluster's speculation.prefill_chunk."""
        self.bundle = load_bundle(bundle_path)
        self.prefill_chunk = prefill_chunk
        self.tokenizer = self.bundle.tokenizer()
        self.backend, self._device, self._threads = backend, device, threads
        self._model = None

    def generate(self, prompt: str, options: GenerationOptions | None = None, *,
                 messages: Sequence[ChatMessage] = (), on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """options.speculative None (or False) decodes plainly; True runs the SPEED core in this process.
        messages: a conversation instead of the prompt, in the bundle's chat template; on_text receives the
        text as it is decoded (never a character a stop string will cut)."""
        options = options or GenerationOptions()
        if not prompt and not messages:
            raise SpeedError("the prompt is empty; give some text for the model to continue")
        if options.max_new_tokens < 1:
            raise SpeedError(f"--max-new-tokens must be at least 1, got {options.max_new_tokens}")
        sampling = options.sampling
        bundle, tokenizer = self.bundle, self.tokenizer
        shown = bundle.conversation_text(messages) if messages else bundle.prompt_text(prompt, chat=options.chat)
        prompt_ids = tokenizer.encode(shown).ids
        check_request(prompt_ids, bundle.config, options.max_new_tokens)
        if self._model is None:
            self._model = open_stage_model(bundle, backend=self.backend, device=self._device, threads=self._threads)
        model = self._model
        stop_strings = StopStrings(tokenizer, list(options.stop))
        should_stop = stop_strings or None
        shown_text = TextStream(tokenizer, stop_strings)
        if on_text is not None:
            should_stop = _streaming(shown_text, on_text, stop_strings)
        decoding = {"max_new_tokens": options.max_new_tokens, "eos_id": -1 if options.ignore_eos else bundle.eos_token_id,
                    "sampling": sampling, "should_stop": should_stop, "prefill_chunk": self.prefill_chunk}
        if options.speculative:
            thresholds = guess_thresholds((options.guess_threshold,), bundle.guess_thresholds, bundle.config.n_stages)
            (generation,) = generate_speculative(model, [prompt_ids], plain_guesses=options.plain_guesses,
                                                 guess_thresholds=thresholds, **decoding)
        else:
            generation = generate_plain(model, prompt_ids, **decoding)
        if on_text is not None and (rest := shown_text.delta(generation.token_ids, final=True)):
            on_text(rest)
        return GenerationResult(
            text=shown_text.text(generation.token_ids), token_ids=generation.token_ids,
            stop_reason=generation.stop_reason, prompt_tokens=generation.prompt_tokens,
            time_to_first_token_ms=generation.first_token_s * 1000, tokens_per_s=generation.tokens_per_s,
            speculative=bool(options.speculative), backend=self.backend, provider=model.provider,
            **({"stats": generation.stats} if generation.stats is not None else {}))


def _streaming(text: TextStream, on_text: Callable[[str], None], stop: StopStrings) -> Callable[[list[int]], bool]:
    """A should_stop hook that also hands on the text each new token makes safe to show."""

    def after_token(generated: list[int]) -> bool:
        if delta := text.delta(generated, final=False):
            on_text(delta)
        return bool(stop) and stop(generated)

    return after_token


def run_reference(prompt: str, options: GenerationOptions | None = None, *, bundle_path: Path | None = None,
                  backend: str = "onnx", device: str = "cpu", threads: int = 1,
                  prefill_chunk: int = PREFILL_CHUNK) -> GenerationResult:
    """One prompt decoded in a freshly opened bundle."""
    return LocalDecoder(bundle_path, backend=backend, device=device, threads=threads,
                        prefill_chunk=prefill_chunk).generate(prompt, options)

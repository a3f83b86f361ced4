"""A text prompt decoded in this process, plain or speculative: what `speed reference` runs."""

from __future__ import annotations

from pathlib import Path

from runtime.core.bundle import load_bundle
from runtime.core.errors import SpeedError
from runtime.core.generation import GenerationOptions, GenerationResult, guess_thresholds
from runtime.core.limits import check_request
from runtime.core.stopping import StopStrings
from runtime.local.backends import open_stage_model
from runtime.local.plain import generate_plain
from runtime.local.speculative import generate_speculative


def run_reference(prompt: str, options: GenerationOptions | None = None, *, bundle_path: Path | None = None,
                  backend: str = "onnx", device: str = "cpu", threads: int = 1) -> GenerationResult:
    """Validate everything cheap first, so bad input fails before any model is loaded.
    options.speculative None (or False) decodes plainly; True runs the SPEED core in this process."""
    options = options or GenerationOptions()
    if not prompt:
        raise SpeedError("the prompt is empty; give some text for the model to continue")
    if options.max_new_tokens < 1:
        raise SpeedError(f"--max-new-tokens must be at least 1, got {options.max_new_tokens}")
    sampling = options.sampling
    bundle = load_bundle(bundle_path)
    tokenizer = bundle.tokenizer()
    prompt_ids = tokenizer.encode(bundle.prompt_text(prompt, chat=options.chat)).ids
    check_request(prompt_ids, bundle.config, options.max_new_tokens)
    model = open_stage_model(bundle, backend=backend, device=device, threads=threads)
    stop_strings = StopStrings(tokenizer, list(options.stop))
    decoding = {"max_new_tokens": options.max_new_tokens, "eos_id": -1 if options.ignore_eos else bundle.eos_token_id,
                "sampling": sampling, "should_stop": stop_strings or None}
    if options.speculative:
        thresholds = guess_thresholds((options.guess_threshold,), bundle.guess_thresholds, bundle.config.n_stages)
        (generation,) = generate_speculative(model, [prompt_ids], plain_guesses=options.plain_guesses,
                                             guess_thresholds=thresholds, **decoding)
    else:
        generation = generate_plain(model, prompt_ids, **decoding)
    return GenerationResult(
        text=stop_strings.cut(tokenizer.decode(generation.token_ids)), token_ids=generation.token_ids,
        stop_reason=generation.stop_reason, prompt_tokens=generation.prompt_tokens,
        time_to_first_token_ms=generation.first_token_s * 1000, tokens_per_s=generation.tokens_per_s,
        speculative=bool(options.speculative), backend=backend, provider=model.provider,
        **({"stats": generation.stats} if generation.stats is not None else {}))

"""Commands that decode a prompt: reference (in this process) and generate (on a running cluster)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.cli.arguments import (
    add_credential_flags,
    add_gate_flag,
    add_sampling_flags,
    add_threads_flag,
    add_window_flag,
    credentials_of,
    number,
    options_from,
    token_count,
    whole,
)
from runtime.core.grouping import PREFILL_CHUNK


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("reference", help="decode in this process, plainly (the text every mode must give) "
                                              "or with --speculate")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--bundle", type=Path, help="bundle directory (default: the shipped demo-4x3 model)")
    p.add_argument("--backend", choices=["onnx", "torch"], default="onnx")
    p.add_argument("--max-new-tokens", type=token_count, default=64)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="onnx backend device")
    add_threads_flag(p)
    p.add_argument("--speculate", action="store_true", help="decode with SPEED's speculative pipeline (same tokens)")
    p.add_argument("--chat", action="store_true", help="PROMPT is a user's message: apply the bundle's chat template")
    p.add_argument("--plain-guesses", action="store_true",
                   help="with --speculate: guess without the bundle's exits (same text)")
    add_gate_flag(p)
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="end at the token that completes TEXT, which the printed text leaves out (repeatable)")
    add_sampling_flags(p)
    p.add_argument("--prefill-chunk", type=whole(1, 1 << 16), default=PREFILL_CHUNK, metavar="N",
                   help=f"prompt positions run in one pass (default {PREFILL_CHUNK}); give a cluster's "
                        "speculation.prefill_chunk to get its text to the bit")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_reference)

    p = commands.add_parser("generate", help="generate text on a running cluster")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--coordinator", default="127.0.0.1:50050", metavar="HOST:PORT",
                   help="the cluster's coordinator (default 127.0.0.1:50050, as in deploy/local.yaml)")
    p.add_argument("--max-new-tokens", type=token_count, default=64)
    p.add_argument("--no-speculation", action="store_true", help="sequential decoding (same text, slower)")
    p.add_argument("--chat", action="store_true", help="PROMPT is a user's message: apply the model's chat template")
    p.add_argument("--plain-guesses", action="store_true", help="guess without the bundle's exits (same text)")
    add_gate_flag(p)
    add_window_flag(p)
    p.add_argument("--stop", action="append", metavar="TEXT", help="end at the token that completes TEXT (repeatable)")
    add_sampling_flags(p)
    p.add_argument("--timeout", type=number(0, 86400, above=True), default=600.0, metavar="S",
                   help="give up after S seconds, queueing included (default 600, at most 86400: a day)")
    p.add_argument("--resume", action="store_true",
                   help="if the coordinator is lost, reconnect within the timeout and continue (same text)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the keys of speed reference --json)")
    add_credential_flags(p)
    p.set_defaults(run=cmd_generate)


def cmd_reference(args: argparse.Namespace) -> None:
    from runtime.local.reference import run_reference

    result = run_reference(args.prompt, options_from(args, speculative=args.speculate), bundle_path=args.bundle,
                           backend=args.backend, device=args.device, threads=args.threads,
                           prefill_chunk=args.prefill_chunk)
    if args.json:
        print(json.dumps(result.to_json()))
        return
    print(result.text if args.chat else args.prompt + result.text)
    print(f"[{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s, first token "
          f"{result.time_to_first_token_ms:.1f} ms, stop: {result.stop_reason}, {result.backend} on {result.provider}]",
          file=sys.stderr)
    if result.speculative:
        print(f"[speculative: {result.stats.describe()}]", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> None:
    from runtime.client import Client

    with Client(args.coordinator, **credentials_of(args)) as client:
        stream = client.generate(args.prompt, options_from(args, speculative=False if args.no_speculation else None),
                                 timeout_s=args.timeout, resume=args.resume)
        if args.json:
            print(json.dumps(stream.result().to_json()))
            return
        echo = "" if args.chat else args.prompt  # printed with the first text, so a refused request printed nothing
        for chunk in stream:
            print(echo + chunk.text, end="", flush=True)
            echo = ""
        result = stream.result()
    print(echo)
    mode = "speculative" if result.speculative else "sequential"
    print(f"[{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s, first token "
          f"{result.time_to_first_token_ms:.1f} ms, stop: {result.stop_reason}; {mode}: {result.stats.describe()}]",
          file=sys.stderr)

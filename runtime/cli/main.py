"""The `speed` command line. Each subcommand parses its flags and calls one function."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from deploy.cluster_file import MAX_THREADS
from runtime.core.errors import SpeedError

# --- argument types: every number on the command line is checked against a range -----------------------------

INT32_MAX = 2**31 - 1  # token counts and top-k travel as int32
SEED_MAX = 2**63 - 1  # seeds travel as int64; numpy and torch want them >= 0
MAX_TOKENS = 1_000_000  # new tokens of one request; the model's context ends it far sooner


def _quoted(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def whole(minimum: int, maximum: int, zero: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number from minimum to maximum; zero says what 0 means, for the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {_quoted(text)}") from None
        if not minimum <= value <= maximum:
            meaning = f" ({zero})" if zero else ""
            raise argparse.ArgumentTypeError(f"must be at least {minimum} and at most {maximum}{meaning}, "
                                             f"got {_quoted(text)}")
        return value

    return parse


def number(minimum: float, maximum: float, *, above: bool = False, zero: str = "") -> Callable[[str], float]:
    """An argparse type: a finite number from minimum (above: excluded) to maximum; zero says what 0 means."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {_quoted(text)}") from None
        low_ok = minimum < value if above else minimum <= value
        if not (math.isfinite(value) and low_ok and value <= maximum):
            meaning = f" ({zero})" if zero else ""
            raise argparse.ArgumentTypeError(f"must be {'above' if above else 'at least'} {minimum:g} and at most "
                                             f"{maximum:g}{meaning}, got {_quoted(text)}")
        return value

    return parse


# the ones used by several flags; a flag with a range of its own calls whole() or number() in place
positive_int = whole(1, INT32_MAX)
positive_float = number(0, 1e9, above=True)
thread_count = whole(0, MAX_THREADS, zero="0 = one per core")
seed_int = whole(0, SEED_MAX)
token_count = whole(1, MAX_TOKENS)
link_ms = number(0, 60_000)  # an EMULATED one-way latency, at most a minute
learning_rate = number(0, 1, above=True)


def cmd_train(args: argparse.Namespace) -> None:
    from runtime.core.config import ModelConfig
    from runtime.models.train import TrainConfig, train

    model_cfg = ModelConfig(
        vocab_size=args.vocab_size, d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.kv_heads,
        ffn_hidden=args.ffn_hidden, n_distinct_layers=args.layers, n_stages=args.stages,
    )
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
        precision=args.precision, threads=args.threads,
    )
    report = train(args.out, model_cfg, cfg, resume=args.resume)
    held_out = report["held_out"]
    print(f"trained {report['model']} ({report['parameters'] / 1e6:.2f}M parameters) for {cfg.steps} steps, "
          f"{report['tokens_seen']} tokens, in {report['train_time_s'] / 60:.1f} min")
    print("held-out loss per stage:      " + "  ".join(f"{x:.3f}" for x in held_out["loss_per_stage"]))
    print("held-out flip rate per boundary: " + "  ".join(f"{x:.1%}" for x in held_out["flip_rate_per_boundary"]))
    print(f"checkpoint: {args.out / 'checkpoint.pt'}  report: {args.out / 'report.json'}")


def cmd_export(args: argparse.Namespace) -> None:
    from runtime.models.export import export_bundle

    out = export_bundle(args.checkpoint, args.out_dir, name=args.name, force=args.force)
    print(f"wrote bundle {out}")


def options_from(args: argparse.Namespace, *, speculative: bool | None):
    """The GenerationOptions that `speed reference` and `speed generate` share."""
    from runtime.core.generation import GenerationOptions

    return GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()), speculative=speculative,
                             chat=args.chat, plain_guesses=args.plain_guesses)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=number(0, 100, zero="0 = greedy"), default=0.0,
                   help="0 = greedy (default); > 0 samples, at most 100")
    p.add_argument("--top-k", type=whole(0, MAX_TOKENS, zero="0 = all"), default=0,
                   help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=number(0, 1, above=True), default=1.0,
                   help="sample within this probability mass, in (0, 1]")
    p.add_argument("--seed", type=seed_int, default=0, help=f"with the position, fixes every random draw (0 to {SEED_MAX})")


def cmd_reference(args: argparse.Namespace) -> None:
    from runtime.local.reference import run_reference

    result = run_reference(args.prompt, options_from(args, speculative=args.speculate), bundle_path=args.bundle,
                           backend=args.backend, device=args.device, threads=args.threads)
    if args.json:
        print(json.dumps(result.to_json()))
        return
    print(result.text if args.chat else args.prompt + result.text)
    print(f"[{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s, first token "
          f"{result.time_to_first_token_ms:.1f} ms, stop: {result.stop_reason}, {result.backend} on {result.provider}]",
          file=sys.stderr)
    if result.speculative:
        print(f"[speculative: {result.stats.describe()}]", file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> None:
    from runtime.bench.local import bench_local, bench_reference, format_local
    from runtime.core.bundle import load_bundle

    if args.requests is not None and args.clients is None:
        raise SpeedError("--requests needs --clients")
    if args.seed is not None and args.chaos is None:
        raise SpeedError("--seed needs --chaos")
    if args.cluster_file is not None:
        if args.reference or args.local:
            raise SpeedError("give either a cluster FILE or one of --reference and --local, not both")
        cmd_bench_cluster(args)
        return
    for flag, value in [("--clients", args.clients), ("--chaos", args.chaos), ("--emulate-link-ms", args.emulate_link_ms)]:
        if value is not None:
            raise SpeedError(f"{flag} needs a cluster FILE")
    if args.reference == args.local:
        raise SpeedError("choose one of a cluster FILE (through a local cluster), --reference (plain decoding: onnx "
                         "vs torch, short vs long context) and --local (sequential vs speculative in one process)")
    if args.local:
        report = bench_local(load_bundle(args.bundle), new_tokens=args.new_tokens or 128, repeats=args.repeats,
                             threads=args.threads)
        print(json.dumps(report) if args.json else format_local(report))
        return
    report = bench_reference(load_bundle(args.bundle), new_tokens=args.new_tokens or 64, repeats=args.repeats,
                             threads=args.threads)
    if args.json:
        print(json.dumps(report))
        return
    rates = report["tokens_per_s"]
    print(f"plain greedy decoding of {report['bundle']}, {report['new_tokens']} new tokens, "
          f"median of {report['repeats']} alternating runs (tokens/s)")
    print(f"  onnx  {rates['onnx']:8.1f}   torch {rates['torch']:8.1f}   onnx/torch {report['onnx_over_torch']:.2f}x")
    print(f"  onnx at 32 tokens of context {rates['context_32']:8.1f}   at 512 {rates['context_512']:8.1f}   "
          f"ratio {report['context_512_over_32']:.2f}")


def cmd_bench_cluster(args: argparse.Namespace) -> None:
    from runtime.bench.cluster import bench_cluster, format_cluster

    if args.clients is not None:
        cmd_bench_load(args)
        return
    if args.chaos is not None:
        cmd_bench_chaos(args)
        return
    report = bench_cluster(args.cluster_file, new_tokens=args.new_tokens or 128, repeats=args.repeats,
                           emulated_link_ms=args.emulate_link_ms)
    print(json.dumps(report) if args.json else format_cluster(report))


def cmd_bench_load(args: argparse.Namespace) -> None:
    from runtime.bench.load import bench_load, format_load

    report = bench_load(args.cluster_file, clients=args.clients, requests=args.requests or 3,
                        new_tokens=args.new_tokens or 48, emulated_link_ms=args.emulate_link_ms)
    print(json.dumps(report) if args.json else format_load(report))


def cmd_bench_chaos(args: argparse.Namespace) -> None:
    from runtime.bench.load import bench_chaos, format_chaos

    report = bench_chaos(args.cluster_file, trials=args.chaos, new_tokens=args.new_tokens or 48, seed=args.seed or 0,
                         emulated_link_ms=args.emulate_link_ms)
    print(json.dumps(report) if args.json else format_chaos(report))


def cmd_models_pull(args: argparse.Namespace) -> None:
    from runtime.models.registry import pull

    configure_logging()
    print(pull(args.name, cache=args.cache))


def cmd_import_gguf(args: argparse.Namespace) -> None:
    from runtime.models.gguf_import import import_gguf

    out = import_gguf(args.file, args.out_dir, stages=args.stages, name=args.name, force=args.force,
                      progress=lambda line: print(line, file=sys.stderr))
    print(f"wrote bundle {out}")


def cmd_train_exit(args: argparse.Namespace) -> None:
    from runtime.models.exit_training import ExitTraining, train_exits

    cfg = ExitTraining(steps=args.steps, rank=args.rank, lr=args.lr, train_windows=args.train_windows,
                       held_out_windows=args.held_out_windows, seed=args.seed)
    report = train_exits(args.bundle, cfg, progress=lambda line: print(line, file=sys.stderr))
    before = "  ".join(f"{x:.1%}" for x in report["flip_rate_per_boundary_before"])
    after = "  ".join(f"{x:.1%}" for x in report["flip_rate_per_boundary_after"])
    print(f"exit adapters (rank {cfg.rank}) written into {args.bundle} in {report['train_time_s']} s; held-out flip "
          f"rate per boundary {before} -> {after}")


def configure_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cmd_node(args: argparse.Namespace) -> None:
    from nodes.daemon import run_node

    configure_logging()
    run_node(args.cluster, args.name, emulated_link_ms=args.emulate_link_ms)


def cmd_coordinator(args: argparse.Namespace) -> None:
    from runtime.coordinator.server import run_coordinator

    configure_logging()
    run_coordinator(args.cluster)


def cmd_up(args: argparse.Namespace) -> None:
    from deploy.launcher import up

    up(args.cluster_file, detach=args.detach, emulated_link_ms=args.emulate_link_ms)


def cmd_down(args: argparse.Namespace) -> None:
    from deploy.launcher import down

    down(args.cluster_file)


def cmd_generate(args: argparse.Namespace) -> None:
    from runtime.client import Client

    with Client(args.coordinator, **credentials_of(args)) as client:
        stream = client.generate(args.prompt, options_from(args, speculative=False if args.no_speculation else None),
                                 timeout_s=args.timeout, resume=args.resume)
        if args.json:
            print(json.dumps(stream.result().to_json()))
            return
        if not args.chat:
            print(args.prompt, end="", flush=True)
        for chunk in stream:
            print(chunk.text, end="", flush=True)
        result = stream.result()
    print()
    mode = "speculative" if result.speculative else "sequential"
    print(f"[{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s, first token "
          f"{result.time_to_first_token_ms:.1f} ms, stop: {result.stop_reason}; {mode}: {result.stats.describe()}]",
          file=sys.stderr)


def cmd_status(args: argparse.Namespace) -> None:
    from runtime.client import Client

    with Client(args.coordinator, **credentials_of(args)) as client:
        status = client.status()
    print(f"cluster {status.cluster}: {'serving' if status.serving else 'NOT serving'}, "
          f"{status.active_requests} active request(s), {status.queued_requests} queued (at most {status.max_queue}), "
          f"bundle {status.bundle_sha256[:12]}")
    for node in status.nodes:
        beat = f"{node.last_heartbeat_s:.1f} s ago" if node.last_heartbeat_s >= 0 else "never"
        running = "" if list(node.hosting) == list(node.stages) else f" running {list(node.hosting)}"
        print(f"  {node.name:12} {node.address:22} stages {list(node.stages)!s:10} {node.state:8} "
              f"sequences {node.sequences}/{node.max_sequences:<3} {node.provider or '-':24} heartbeat {beat}{running}")


def add_credential_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca", metavar="FILE", help="a secure cluster's CA certificate (default $SPEED_CA)")
    p.add_argument("--token", help="bearer token (default $SPEED_TOKEN)")
    p.add_argument("--cert", metavar="FILE", help="client certificate, where the cluster asks for one (default $SPEED_CERT)")
    p.add_argument("--key", metavar="FILE", help="the client certificate's key (default $SPEED_KEY)")


def credentials_of(args: argparse.Namespace) -> dict:
    return {"ca": args.ca, "token": args.token, "cert": args.cert, "key": args.key}


def cmd_certs_init(args: argparse.Namespace) -> None:
    from deploy.certs import init_certs
    from deploy.cluster_file import load_cluster

    written = init_certs(args.directory, load_cluster(args.cluster), days=args.days, force=args.force)
    print(f"wrote {len(written)} files to {args.directory} (keys and tokens readable by you only): {', '.join(written)}")
    print(f"the client token is in {args.directory / 'client.token'}; more with: speed tokens add NAME --cluster "
          f"{args.cluster}")


def tokens_file(cluster: Path) -> Path:
    from deploy.cluster_file import load_cluster
    from runtime.coordinator.tokens import TOKENS_FILE

    spec = load_cluster(cluster)
    if spec.security is None:
        raise SpeedError(f"{cluster} has no security section, so its clients need no token; add one (see speed certs init)")
    if not spec.security.certs.is_dir():
        raise SpeedError(f"{spec.security.certs} does not exist; make it first with speed certs init "
                         f"{spec.security.certs} --cluster {cluster}")
    return spec.security.certs / TOKENS_FILE


def cmd_tokens_add(args: argparse.Namespace) -> None:
    from runtime.coordinator.tokens import add_token

    print(add_token(tokens_file(args.cluster), args.name))


def cmd_tokens_remove(args: argparse.Namespace) -> None:
    from runtime.coordinator.tokens import remove_token

    remove_token(tokens_file(args.cluster), args.name)
    print(f"token {args.name} removed; the coordinator refuses it from now on")


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes get one line naming the problem, not the whole usage block."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="speed", description="SPEED: speculative pipelined decoding runtime")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrorParser)

    p = commands.add_parser("train", help="train a weight-shared decoder on the offline corpus")
    p.add_argument("--out", type=Path, required=True, help="directory for checkpoint.pt and report.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--layers", type=whole(1, 1024), default=4, help="N_d: distinct layers per stage (default 4)")
    p.add_argument("--stages", type=whole(1, 1024), default=3, help="G: stages sharing those layers (default 3)")
    p.add_argument("--d-model", type=whole(1, 65536), default=256)
    p.add_argument("--heads", type=whole(1, 1024), default=8)
    p.add_argument("--kv-heads", type=whole(1, 1024), default=4)
    p.add_argument("--ffn-hidden", type=whole(1, 262144), default=768)
    p.add_argument("--vocab-size", type=whole(1, 1 << 20), default=4096)
    p.add_argument("--steps", type=whole(1, 10_000_000), default=1500)
    p.add_argument("--batch-size", type=whole(1, 65536), default=16)
    p.add_argument("--seq-len", type=whole(1, 65536), default=256)
    p.add_argument("--lr", type=learning_rate, default=2e-3, help="learning rate, in (0, 1]")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="CPU autocast dtype")
    p.add_argument("--threads", type=thread_count, default=0,
                   help=f"torch threads; 0 = one per core (default), at most {MAX_THREADS}")
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("export", help="export a checkpoint to an ONNX bundle")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="checkpoint.pt written by speed train")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="bundle directory to create")
    p.add_argument("--name", help="bundle name (default speed-NdxG)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(run=cmd_export)

    p = commands.add_parser("models", help="pretrained models the runtime can fetch")
    models = p.add_subparsers(dest="models_command", required=True, metavar="ACTION", parser_class=OneLineErrorParser)
    q = models.add_parser("pull", help="download a known model into the cache (once) and print its path")
    q.add_argument("name", metavar="NAME", help="e.g. smollm2-135m")
    q.add_argument("--cache", type=Path, help="cache directory (default $SPEED_CACHE_DIR or ~/.cache/speed/models)")
    q.set_defaults(run=cmd_models_pull)

    p = commands.add_parser("import", help="turn a pretrained model file into a bundle")
    formats = p.add_subparsers(dest="import_format", required=True, metavar="FORMAT", parser_class=OneLineErrorParser)
    q = formats.add_parser("gguf", help="a Llama-family GGUF file; stages are contiguous layer ranges")
    q.add_argument("file", type=Path, metavar="FILE")
    q.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="bundle directory to create")
    q.add_argument("--stages", type=whole(1, 1024), required=True, help="pipeline stages, 1 to the layer count")
    q.add_argument("--name", help="bundle name (default: the file's name)")
    q.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    q.set_defaults(run=cmd_import_gguf)

    p = commands.add_parser("train-exit", help="train exit adapters that improve a bundle's early guesses")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle directory, updated in place")
    p.add_argument("--steps", type=whole(1, 10_000_000), default=600)
    p.add_argument("--rank", type=whole(1, 65536), default=256, help="rank of each low-rank adapter")
    p.add_argument("--lr", type=learning_rate, default=3e-3, help="learning rate, in (0, 1]")
    p.add_argument("--train-windows", type=whole(1, 1_000_000), default=128, help="128-token windows of training text")
    p.add_argument("--held-out-windows", type=whole(1, 1_000_000), default=24, help="windows of held-out text")
    p.add_argument("--seed", type=seed_int, default=0)
    p.set_defaults(run=cmd_train_exit)

    p = commands.add_parser("reference", help="plain greedy decoding in one process, no speculation")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--bundle", type=Path, help="bundle directory (default: the shipped demo-4x3 model)")
    p.add_argument("--backend", choices=["onnx", "torch"], default="onnx")
    p.add_argument("--max-new-tokens", type=token_count, default=64)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="onnx backend device")
    p.add_argument("--threads", type=thread_count, default=1,
                   help=f"intra-op threads; 0 = one per core, at most {MAX_THREADS} (default 1: fastest for one "
                        "sequence here)")
    p.add_argument("--speculate", action="store_true", help="decode with SPEED's speculative pipeline (same tokens)")
    p.add_argument("--chat", action="store_true", help="PROMPT is a user's message: apply the bundle's chat template")
    p.add_argument("--plain-guesses", action="store_true",
                   help="with --speculate: guess without the bundle's exit adapters (same text)")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="end at the token that completes TEXT, which the printed text leaves out (repeatable)")
    add_sampling_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_reference)

    p = commands.add_parser("bench", help="measure decoding speed")
    p.add_argument("cluster_file", type=Path, nargs="?", metavar="FILE",
                   help="a cluster file: start it here, then sequential vs speculative through the cluster "
                        "(or --clients, --chaos)")
    p.add_argument("--emulate-link-ms", type=link_ms, metavar="MS",
                   help="with FILE: EMULATED one-way latency of every node's link, 0 to 60000 (overrides the file)")
    p.add_argument("--reference", action="store_true", help="plain decoding: onnx vs torch, context 32 vs 512")
    p.add_argument("--local", action="store_true", help="sequential vs speculative decoding in one process")
    p.add_argument("--bundle", type=Path, help="bundle directory (default: the shipped demo-4x3 model)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--clients", type=whole(1, 1000), metavar="N",
                      help="with FILE: 1 client against N concurrent clients: tokens/s, latency, errors, memory")
    load.add_argument("--chaos", type=whole(1, 10_000), metavar="N",
                      help="with FILE: N generations, a random node SIGKILLed during each, tokens checked, node restarted")
    p.add_argument("--requests", type=whole(1, 10_000), help="with --clients: requests per client (default 3)")
    p.add_argument("--seed", type=seed_int, help="with --chaos: seed of the random kills (default 0)")
    p.add_argument("--new-tokens", type=token_count,
                   help="tokens per run (default 64 reference, 128 local and FILE, 48 --clients and --chaos)")
    p.add_argument("--repeats", type=whole(1, 1000), default=3)
    p.add_argument("--threads", type=thread_count, default=1,
                   help=f"intra-op threads; 0 = one per core, at most {MAX_THREADS} (default 1: fastest for one "
                        "sequence here)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_bench)

    p = commands.add_parser("up", help="start a cluster file's coordinator and nodes on this machine")
    p.add_argument("cluster_file", type=Path, metavar="FILE", help="cluster file, e.g. deploy/local.yaml")
    p.add_argument("--detach", action="store_true", help="leave it running in the background; stop with speed down")
    p.add_argument("--emulate-link-ms", type=link_ms, metavar="MS",
                   help="EMULATED one-way latency of every node's link, 0 to 60000, for benchmarks (overrides the file)")
    p.set_defaults(run=cmd_up)

    p = commands.add_parser("down", help="stop a cluster started with speed up --detach")
    p.add_argument("cluster_file", type=Path, metavar="FILE")
    p.set_defaults(run=cmd_down)

    p = commands.add_parser("coordinator", help="run a cluster's coordinator alone (each device runs speed node)")
    p.add_argument("--cluster", type=Path, required=True, metavar="FILE")
    p.set_defaults(run=cmd_coordinator)

    p = commands.add_parser("node", help="run one node daemon of a cluster (on its edge device)")
    p.add_argument("--cluster", type=Path, required=True, metavar="FILE")
    p.add_argument("--name", required=True, help="the node's name in the cluster file")
    p.add_argument("--emulate-link-ms", type=link_ms, metavar="MS",
                   help="EMULATED one-way latency per step message, 0 to 60000, for benchmarks (overrides the file)")
    p.set_defaults(run=cmd_node)

    p = commands.add_parser("generate", help="generate text on a running cluster")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--coordinator", default="127.0.0.1:50050", metavar="HOST:PORT",
                   help="the cluster's coordinator (default 127.0.0.1:50050, as in deploy/local.yaml)")
    p.add_argument("--max-new-tokens", type=token_count, default=64)
    p.add_argument("--no-speculation", action="store_true", help="sequential decoding (same text, slower)")
    p.add_argument("--chat", action="store_true", help="PROMPT is a user's message: apply the model's chat template")
    p.add_argument("--plain-guesses", action="store_true", help="guess without the bundle's exit adapters (same text)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="end at the token that completes TEXT (repeatable)")
    add_sampling_flags(p)
    p.add_argument("--timeout", type=number(0, 86400, above=True), default=600.0, metavar="S",
                   help="give up after S seconds, queueing included (default 600, at most 86400: a day)")
    p.add_argument("--resume", action="store_true",
                   help="if the coordinator is lost, reconnect within the timeout and continue (same text)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the keys of speed reference --json)")
    add_credential_flags(p)
    p.set_defaults(run=cmd_generate)

    p = commands.add_parser("status", help="show a running cluster's nodes")
    p.add_argument("--coordinator", default="127.0.0.1:50050", metavar="HOST:PORT")
    add_credential_flags(p)
    p.set_defaults(run=cmd_status)

    p = commands.add_parser("certs", help="certificates of a secure cluster")
    certs = p.add_subparsers(dest="certs_command", required=True, metavar="COMMAND", parser_class=OneLineErrorParser)
    q = certs.add_parser("init", help="a CA and one certificate per process, a client certificate and a client token")
    q.add_argument("directory", type=Path, metavar="DIR")
    q.add_argument("--cluster", type=Path, required=True, metavar="FILE", help="names and addresses come from it")
    q.add_argument("--days", type=whole(1, 36500), default=365, help="validity of the process certificates (default 365)")
    q.add_argument("--force", action="store_true", help="replace DIR if it exists")
    q.set_defaults(run=cmd_certs_init)

    p = commands.add_parser("tokens", help="client bearer tokens of a secure cluster")
    tokens = p.add_subparsers(dest="tokens_command", required=True, metavar="COMMAND", parser_class=OneLineErrorParser)
    for name, what, run in (("add", "make a token for NAME and print it (shown once)", cmd_tokens_add),
                            ("remove", "revoke NAME's token", cmd_tokens_remove)):
        q = tokens.add_parser(name, help=what)
        q.add_argument("name", metavar="NAME")
        q.add_argument("--cluster", type=Path, required=True, metavar="FILE", help="a cluster file with a security section")
        q.set_defaults(run=run)
    return parser


TRAINING_MODULES = {"torch", "onnx", "onnxscript", "tqdm", "gguf"}  # the `train` extra, which nodes do without


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for position, argument in enumerate(argv, start=1):
        try:
            argument.encode("utf-8")  # bytes that are not UTF-8 reach Python as lone surrogates, which refuse
        except UnicodeEncodeError:
            print(f"speed: error: argument {position} is not valid UTF-8 text; pass text in UTF-8", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except SpeedError as exc:
        print(f"speed {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if exc.name not in TRAINING_MODULES:
            raise
        print(f"speed {args.command}: error: this command needs {exc.name}, part of the training extra; "
              "install it with: pip install -e '.[train]' -c constraints.txt", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"speed {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


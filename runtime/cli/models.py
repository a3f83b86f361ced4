"""Commands that make and change bundles: train, export, models pull, import gguf, train-exit."""

from __future__ import annotations

import argparse
from pathlib import Path

from runtime.cli.arguments import (
    OneLineErrorParser,
    configure_logging,
    learning_rate,
    number,
    seed_int,
    thread_count,
    whole,
)
from runtime.cli.progress import stderr_progress
from runtime.core.cluster_file import MAX_THREADS
from runtime.core.config import EXIT_KINDS


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="train a weight-shared decoder on the offline corpus")
    p.add_argument("--out", type=Path, required=True, help="directory for checkpoint.pt and report.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--init", type=Path, metavar="BUNDLE",
                   help="start from a float32 bundle's weights and tokenizer (its architecture replaces the flags)")
    p.add_argument("--agreement-weight", type=number(0, 1000), default=0.0, metavar="W",
                   help="add W x the early stages' KL divergence from the last stage: fewer flips (default 0)")
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
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="CPU autocast dtype; auto (default): bf16 where the CPU has native bf16 (avx512_bf16, amx_bf16 "
                        "or Arm bf16 in /proc/cpuinfo), else fp32")
    p.add_argument("--threads", type=thread_count, default=0,
                   help=f"torch threads; 0 = one per core (default), at most {MAX_THREADS}")
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("export", help="export a checkpoint to an ONNX bundle, or a bundle again")
    p.add_argument("checkpoint", type=Path, metavar="SOURCE",
                   help="checkpoint.pt written by speed train, or a float32 bundle directory, whose graphs are exported "
                        "again from its own weights (bundles exported by older versions get the current graphs)")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="bundle directory to create")
    p.add_argument("--name", help="bundle name (default speed-NdxG, or the bundle's own)")
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
    stages = q.add_mutually_exclusive_group(required=True)
    stages.add_argument("--stages", type=whole(1, 1024), help="pipeline stages, 1 to the layer count, as even as they go")
    stages.add_argument("--stage-layers", type=layer_counts, metavar="N,N,...",
                        help="layers of each stage, first to last, e.g. 11,12,7 (fewer on the last stage, which also "
                             "runs the classifier)")
    q.add_argument("--weights", choices=["auto", "f32", "q4"], default="auto",
                   help="auto: the file's kind (default): q4 when its layers are all Q4_0 / Q4_1 / Q8_0 blocks, "
                        "else f32; f32: float32 (what train-exit and the torch backend read); q4: for serving, "
                        "layers keeping the file's own Q4_0 / Q4_1 blocks (and with int8 activations its Q8_0 "
                        "ones, the embedding's included), other matrices quantized to int4")
    accuracy_level_argument(q)
    q.add_argument("--no-calibrate", action="store_true",
                   help="leave the confidence gate of its guesses unchosen (every guess sent until `speed calibrate`, "
                        "or `speed train-exit`, which ends by choosing it)")
    q.add_argument("--name", help="bundle name (default: the file's name)")
    q.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    q.set_defaults(run=cmd_import_gguf)

    p = commands.add_parser("quantize", help="a copy of a bundle with 4- or 8-bit weights (smaller, faster on CPU)")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="a float32 bundle directory")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="bundle directory to create")
    p.add_argument("--weights", choices=["int4", "int8"], default="int4", help="bits per weight (default int4)")
    p.add_argument("--block-size", type=whole(16, 4096), default=32,
                   help="input channels per scale and zero point, a power of two (default 32, as GGUF's Q4_1)")
    accuracy_level_argument(p)
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(run=cmd_quantize)

    p = commands.add_parser("train-exit", help="train exits that improve a bundle's early guesses")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle directory, updated in place")
    p.add_argument("--kind", choices=EXIT_KINDS, default="layer",
                   help="layer: one decoder layer with its own cache (default); low-rank: h + (h A) B; affine: h W + b")
    p.add_argument("--steps", type=whole(1, 10_000_000), default=600, help="training steps per early stage")
    p.add_argument("--rank", type=whole(1, 65536), default=256, help="rank of each low-rank exit")
    p.add_argument("--lr", type=learning_rate, default=1e-3, help="learning rate, in (0, 1]")
    p.add_argument("--train-windows", type=whole(1, 1_000_000), default=128, help="128-token windows of training text")
    p.add_argument("--held-out-windows", type=whole(1, 1_000_000), default=24, help="windows of held-out text")
    p.add_argument("--seed", type=seed_int, default=0)
    p.set_defaults(run=cmd_train_exit)

    p = commands.add_parser("calibrate", help="choose the confidence gate of a bundle's guesses from held-out text")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle directory, updated in place")
    p.add_argument("--windows", type=whole(1, 100_000), default=24, help="held-out windows (default 24)")
    p.add_argument("--window", type=whole(2, 65536), default=128, help="tokens per window (default 128)")
    p.add_argument("--min-precision", type=number(0, 1, above=True), default=0.5, metavar="P",
                   help="send guesses only where at least this share agrees with the final prediction (default 0.5)")
    p.add_argument("--guess-vocabulary", type=number(0, 1, above=True), metavar="SHARE",
                   help="guesses score only this share of the vocabulary, its most frequent tokens in held-out text "
                        "(1 = every token, no guess head; default 0.25 where the classifier costs at least a quarter "
                        "of a stage pass, else 1)")
    p.set_defaults(run=cmd_calibrate)


def cmd_train(args: argparse.Namespace) -> None:
    from runtime.core.config import ModelConfig
    from runtime.core.errors import SpeedError
    from runtime.models.train import TrainConfig, train

    model_cfg = ModelConfig(
        vocab_size=args.vocab_size, d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.kv_heads,
        ffn_hidden=args.ffn_hidden, n_distinct_layers=args.layers, n_stages=args.stages,
    )
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
        precision=args.precision, threads=args.threads, agreement_weight=args.agreement_weight,
    )
    if args.resume and args.init is not None:
        raise SpeedError("give --resume (continue OUT's run) or --init BUNDLE (start a new one from it), not both")
    report = train(args.out, model_cfg, cfg, resume=args.resume, init=args.init, progress=stderr_progress())
    held_out = report["held_out"]
    print(f"trained {report['model']} ({report['parameters'] / 1e6:.2f}M parameters) for {cfg.steps} steps, "
          f"{report['tokens_seen']} tokens, in {report['train_time_s'] / 60:.1f} min")
    print("held-out loss per stage:      " + "  ".join(f"{x:.3f}" for x in held_out["loss_per_stage"]))
    print("held-out flip rate per boundary: " + "  ".join(f"{x:.1%}" for x in held_out["flip_rate_per_boundary"]))
    print(f"precision: {report['precision']}  checkpoint: {args.out / 'checkpoint.pt'}  report: {args.out / 'report.json'}")


def cmd_export(args: argparse.Namespace) -> None:
    from runtime.models.export import export_bundle

    out = export_bundle(args.checkpoint, args.out_dir, name=args.name, force=args.force)
    print(f"wrote bundle {out}")


def cmd_models_pull(args: argparse.Namespace) -> None:
    from runtime.models.registry import pull

    configure_logging()
    print(pull(args.name, cache=args.cache, progress=stderr_progress()))


def accuracy_level_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--accuracy-level", type=whole(1, 4), choices=[1, 4], default=4,
                        help="arithmetic of the quantized weights: 4 int8 activations (default; fast on CPUs, the "
                             "same bits for a row in any batch), 1 float32 (slower; int8 weights very slow)")


def cmd_import_gguf(args: argparse.Namespace) -> None:
    from runtime.models.gguf_file import GGUFModel

    stages = args.stage_layers if args.stage_layers is not None else args.stages
    model_file = GGUFModel(args.file)
    model_file.config(stages)  # a bad file or stage count is named at once, before torch and ONNX load

    from runtime.models.gguf_import import import_gguf

    report = import_gguf(model_file, args.out_dir, stages=stages, weights=args.weights,
                         accuracy_level=args.accuracy_level, name=args.name, force=args.force,
                         gate=not args.no_calibrate, progress=stderr_progress())
    if report is not None:
        print(gate_line(report, args.out_dir))
    print(f"wrote bundle {args.out_dir}")


def layer_counts(text: str) -> tuple[int, ...]:
    """"11,12,7" -> (11, 12, 7): layers per stage, each at least 1."""
    try:
        return tuple(whole(1, 1024)(part) for part in text.split(","))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"give each stage's layer count separated by commas, e.g. 11,12,7 "
                                         f"({exc})") from None


def cmd_quantize(args: argparse.Namespace) -> None:
    from runtime.models.quantize import Quantization, quantize_bundle

    settings = Quantization(weights=args.weights, block_size=args.block_size, accuracy_level=args.accuracy_level)
    out = quantize_bundle(args.bundle, args.out_dir, settings, force=args.force, progress=stderr_progress())
    print(f"wrote bundle {out}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from runtime.models.guess_gate import Calibration, calibrate

    report = calibrate(args.bundle, Calibration(windows=args.windows, window=args.window,
                                                min_precision=args.min_precision, guess_vocabulary=args.guess_vocabulary),
                       progress=stderr_progress())
    print(gate_line(report, args.bundle))


def gate_line(report: dict, bundle: Path) -> str:
    """What a calibration chose, in one line."""
    thresholds = "  ".join(f"{stage['threshold']:.3f}" for stage in report["stages"])
    vocabulary = report["guess_vocabulary"]
    scored = ("no guesses sent" if all(stage["threshold"] >= 1 for stage in report["stages"])
              else f"guesses score the {vocabulary} most frequent tokens" if vocabulary < report["vocab_size"]
              else "guesses score every token")
    return (f"guess thresholds per early stage {thresholds} ({scored}) written into {bundle} "
            f"({report['positions']} held-out positions)")


def cmd_train_exit(args: argparse.Namespace) -> None:
    from runtime.models.exit_training import ExitTraining, train_exits

    cfg = ExitTraining(kind=args.kind, steps=args.steps, rank=args.rank, lr=args.lr, train_windows=args.train_windows,
                       held_out_windows=args.held_out_windows, seed=args.seed)
    report = train_exits(args.bundle, cfg, progress=stderr_progress())
    before = "  ".join(f"{x:.1%}" for x in report["flip_rate_per_boundary_before"])
    after = "  ".join(f"{x:.1%}" for x in report["flip_rate_per_boundary_after"])
    print(f"{cfg.kind} exits written into {args.bundle} in {report['train_time_s']} s; held-out flip rate per "
          f"boundary {before} -> {after}")

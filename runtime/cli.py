"""The `speed` command line. Each subcommand parses its flags and calls one function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.errors import SpeedError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_train(args: argparse.Namespace) -> None:
    from runtime.config import ModelConfig
    from runtime.train import TrainConfig, train

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speed", description="SPEED: speculative pipelined decoding runtime")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("train", help="train a weight-shared decoder on the offline corpus")
    p.add_argument("--out", type=Path, required=True, help="directory for checkpoint.pt and report.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--layers", type=positive_int, default=4, help="N_d: distinct layers per stage (default 4)")
    p.add_argument("--stages", type=positive_int, default=3, help="G: stages sharing those layers (default 3)")
    p.add_argument("--d-model", type=positive_int, default=256)
    p.add_argument("--heads", type=positive_int, default=8)
    p.add_argument("--kv-heads", type=positive_int, default=4)
    p.add_argument("--ffn-hidden", type=positive_int, default=768)
    p.add_argument("--vocab-size", type=positive_int, default=4096)
    p.add_argument("--steps", type=positive_int, default=1500)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="CPU autocast dtype")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.set_defaults(run=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except SpeedError as exc:
        print(f"speed {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"speed {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

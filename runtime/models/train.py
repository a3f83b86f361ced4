"""`speed train`: train a weight-shared decoder with SPEED's weighted per-stage loss.

Seeded and resumable: the checkpoint holds the model, the optimizer, the step and the state of the
random stream that picks training windows, so a resumed run continues exactly where it stopped.
A run may start from a bundle's weights and tokenizer (`--init BUNDLE`), e.g. to continue the shipped
demo model with `--agreement-weight`: that adds, per early stage, the KL divergence from the last
stage's distribution (held fixed) to the stage's own, pulling early predictions towards the final one
so that fewer guesses flip.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from runtime.core.config import ModelConfig
from runtime.core.errors import SpeedError
from runtime.core.progress import NO_PROGRESS, Progress
from runtime.models.checkpoint import load_checkpoint, save_checkpoint
from runtime.models.corpus import load_shakespeare
from runtime.models.decoder import SpeedDecoder, speed_loss
from runtime.models.tokenizer import eos_id, train_tokenizer

PRECISIONS = ("auto", "bf16", "fp32")
CPUINFO = Path("/proc/cpuinfo")
# CPU feature flags of native bf16 arithmetic, as Linux names them in /proc/cpuinfo: x86's AVX512-BF16 and
# AMX-BF16 ("flags"), Arm's BF16 ("Features"). Without one of them bf16 autocast is emulated, ~20x slower.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500  # optimizer steps
    batch_size: int = 16  # windows per step
    seq_len: int = 256  # tokens per window
    lr: float = 2e-3  # peak learning rate, reached after warmup, cosine decay to 10%
    warmup: int = 100  # steps of linear warmup
    weight_decay: float = 0.1
    seed: int = 0
    precision: str = "auto"  # autocast dtype on CPU: bf16, fp32, or auto (bf16 where the CPU has it natively)
    checkpoint_every: int = 100  # steps
    threads: int = 0  # torch threads; 0 = all cores
    eval_windows: int = 0  # held-out windows of seq_len tokens in the final report; 0 = all of them
    agreement_weight: float = 0.0  # weight of the early stages' KL divergence from the last stage

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise SpeedError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise SpeedError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.lr <= 0:
            raise SpeedError(f"--lr must be positive, got {self.lr}")
        if not self.agreement_weight >= 0:
            raise SpeedError(f"--agreement-weight must be 0 or more, got {self.agreement_weight}")


def cpu_has_native_bf16() -> bool:
    """Whether the CPU does bf16 arithmetic in hardware, from the feature flags Linux lists in /proc/cpuinfo;
    False where that file cannot be read (another system), so the choice errs on the side of fp32."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and BF16_FLAGS.intersection(value.split()):
            return True
    return False


def choose_precision(requested: str) -> str:
    """The precision a run uses: bf16 or fp32 as requested, and for auto bf16 only where the CPU has it natively."""
    if requested != "auto":
        return requested
    return "bf16" if cpu_has_native_bf16() else "fp32"


def encode_works(tokenizer: Tokenizer, works: list[str]) -> np.ndarray:
    """Token ids of all works, each followed by EOS, as one int64 array."""
    eos = eos_id(tokenizer)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(works):
        ids.extend(encoding.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def sample_batch(tokens: np.ndarray, rng: np.random.Generator, cfg: TrainConfig) -> torch.Tensor:
    """(batch, seq_len + 1) random windows; inputs are [:, :-1], targets [:, 1:]."""
    starts = rng.integers(0, len(tokens) - cfg.seq_len - 1, size=cfg.batch_size)
    return torch.from_numpy(np.stack([tokens[s : s + cfg.seq_len + 1] for s in starts]))


@torch.no_grad()
def evaluate(model: SpeedDecoder, tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> dict:
    """Held-out loss per stage and flip rate per stage boundary, over non-overlapping windows.

    A flip at boundary s is a position whose greedy prediction after stage s+1 differs from
    its prediction after stage s.
    """
    model.eval()
    n_windows = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    G = model.cfg.n_stages
    loss_sums, flip_counts, count = np.zeros(G), np.zeros(G - 1), 0
    for first in range(0, n_windows, 16):
        idx = range(first, min(first + 16, n_windows))
        batch = torch.from_numpy(np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in idx]))
        stage_logits = model(batch[:, :-1])
        targets = batch[:, 1:].flatten()
        predictions = [logits.argmax(-1).flatten() for logits in stage_logits]
        for s, logits in enumerate(stage_logits):
            loss_sums[s] += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets, reduction="sum").item()
        for s in range(G - 1):
            flip_counts[s] += (predictions[s] != predictions[s + 1]).sum().item()
        count += targets.numel()
    model.train()
    return {
        "tokens": count,
        "loss_per_stage": [round(x / count, 4) for x in loss_sums],
        "flip_rate_per_boundary": [round(x / count, 4) for x in flip_counts],
    }


def agreement_loss(stage_logits: list[torch.Tensor]) -> torch.Tensor:
    """Per token, the sum over early stages of KL(last stage || stage), the last stage held fixed."""
    target = F.log_softmax(stage_logits[-1].detach().float(), -1).flatten(0, 1)
    return sum(F.kl_div(F.log_softmax(logits.float(), -1).flatten(0, 1), target, log_target=True,
                        reduction="batchmean") for logits in stage_logits[:-1])


def start_from_bundle(path: Path) -> tuple[SpeedDecoder, Tokenizer, dict]:
    """A float32 bundle's torch model (trainable), tokenizer, and name and hash for the record."""
    from runtime.core.bundle import load_bundle
    from runtime.models.torch_backend import model_from_bundle

    bundle = load_bundle(path)
    if bundle.quantized:
        raise SpeedError(f"bundle {path} is quantized; start from the float32 bundle it was made from")
    origin = {"bundle": bundle.manifest["name"], "sha256": bundle.sha256}
    return model_from_bundle(bundle).train().requires_grad_(True), bundle.tokenizer(), origin


def train(out_dir: Path, model_cfg: ModelConfig, cfg: TrainConfig, *, resume: bool, init: Path | None = None,
          progress: Progress = NO_PROGRESS) -> dict:
    """init: start from this bundle's weights and tokenizer (its model config replaces model_cfg)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    corpus = load_shakespeare()
    start, origin = None, None  # origin: the bundle a run started from
    if resume:
        state = load_checkpoint(checkpoint_path)
        model_cfg, cfg = state["model_config"], TrainConfig(**{**state["train_config"], "steps": cfg.steps})
        tokenizer = Tokenizer.from_str(state["tokenizer"])
        origin = state.get("initialized_from")
    elif init is not None:
        torch.manual_seed(cfg.seed)
        start, tokenizer, origin = start_from_bundle(init)
        model_cfg, state = start.cfg, None
    else:
        torch.manual_seed(cfg.seed)
        tokenizer = train_tokenizer(corpus.train, model_cfg.vocab_size)
        state = None
    if tokenizer.get_vocab_size() != model_cfg.vocab_size:
        raise SpeedError(
            f"the tokenizer learned only {tokenizer.get_vocab_size()} tokens from the corpus; "
            f"use --vocab-size {tokenizer.get_vocab_size()} or less"
        )
    cfg = replace(cfg, precision=choose_precision(cfg.precision))  # kept in the checkpoint: a resumed run keeps it
    train_tokens = encode_works(tokenizer, corpus.train)
    held_out_tokens = encode_works(tokenizer, corpus.held_out)

    model = start or SpeedDecoder(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    step, elapsed = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["data_rng"]
        step, elapsed = state["step"], state["elapsed_s"]

    def checkpoint() -> None:
        save_checkpoint(checkpoint_path, {
            "model_config": model_cfg.to_dict(),
            "train_config": asdict(cfg),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "data_rng": rng.bit_generator.state,
            "step": step,
            "elapsed_s": elapsed,
            "tokenizer": tokenizer.to_str(),
            "initialized_from": origin,
        })

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.precision == "bf16" else contextlib.nullcontext()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    model.train()
    with progress.task("steps", total=cfg.steps):
        progress.advance(step)  # a resumed run counts from its checkpoint
        while step < cfg.steps:
            started = time.perf_counter()
            batch = sample_batch(train_tokens, rng, cfg)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            with autocast:
                stage_logits = model(batch[:, :-1])
                loss, stage_losses = speed_loss(stage_logits, batch[:, 1:])
                if cfg.agreement_weight:
                    loss = loss + cfg.agreement_weight * agreement_loss(stage_logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            step_time = time.perf_counter() - started
            elapsed += step_time
            progress.advance(status=f"loss {loss.item():.3f}, last stage {stage_losses[-1]:.3f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint()
                progress.note(f"step {step}/{cfg.steps}: loss {loss.item():.3f}, checkpoint written")  # for logs

    report = {
        "model": model_cfg.name,
        "model_config": model_cfg.to_dict(),
        "train_config": asdict(cfg),
        "precision": cfg.precision,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens_in_corpus": int(len(train_tokens)),
        "tokens_seen": step * tokens_per_step,
        "train_time_s": round(elapsed, 1),
        "initialized_from": origin,
        "held_out": evaluate(model, held_out_tokens, cfg.seq_len, cfg.eval_windows or None),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

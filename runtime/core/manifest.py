"""The checks of a bundle's manifest.json, all in one place.

`check_manifest` reads every key of the manifest that the runtime reads later, with its type, its range and
how it agrees with the model config and the listed files, so a bundle that loads never meets a missing key or
a value of the wrong type afterwards. A wrong key is named by its path (`files["head.onnx"].sha256`) in one
sentence with what was expected. Keys the runtime does not read (architecture, source, reports) are free.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.core.config import EXIT_KINDS, ModelConfig
from runtime.core.errors import SpeedError

FORMAT = "speed-bundle/1"
MANIFEST_FILE = "manifest.json"
REEXPORT = "re-export the bundle (speed export / speed import gguf)"
EMBEDDING_DTYPES = {"<f4": 4, "int8": 1, "q8_0": 1}  # an embedding table's element type -> bytes per element
SCALE_BLOCK = 32  # input channels per scale of a q8_0 table (GGUF's Q8_0 blocks)
MAX_NAME_BYTES = 255  # the longest file name common file systems take
SHA256 = re.compile(r"[0-9a-f]{64}")


class _Wrong(Exception):
    """One key's problem: the middle of the sentence, after "manifest.json"."""


def check_manifest(manifest: Any, directory: Path) -> ModelConfig:
    """The model config of a valid manifest; a SpeedError naming the bundle and the wrong key otherwise."""
    try:
        return _check(manifest)
    except _Wrong as exc:
        raise SpeedError(f"bundle {directory}: {MANIFEST_FILE} {exc}; {REEXPORT}") from None


def _check(manifest: Any) -> ModelConfig:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _Wrong(f"is not a '{FORMAT}' manifest")
    files = _files(manifest)
    config = _model_config(manifest)
    _key(manifest, "name", "the model's name as text", lambda v: isinstance(v, str) and v != "")
    _key(manifest, "eos_token_id", f"a token id from 0 to {config.vocab_size - 1}",
         lambda v: _is_int(v) and 0 <= v < config.vocab_size)
    stages = _key(manifest, "stages", f"a list of {config.n_stages} stages, as many as model_config.n_stages",
                  lambda v: isinstance(v, list) and len(v) == config.n_stages)
    for i, stage in enumerate(stages):
        _file(_mapping(stage, f"stages[{i}]", "a mapping with its graph"), "graph", files, f"stages[{i}]")
    _file(manifest, "head", files)
    _file(manifest, "tokenizer", files)
    _embedding(manifest, files, config)
    _exits(manifest, files, config)
    _guess_head(manifest, files)
    gate = _optional_mapping(manifest, "guess_gate", "a mapping with thresholds, or null")
    early = config.n_stages - 1
    _key(gate, "thresholds", f"a list of {early} probabilities from 0 to 1, one per early stage",
         lambda v: isinstance(v, list) and len(v) in (0, early) and all(_is_number(t) and 0 <= t <= 1 for t in v),
         where="guess_gate", optional=True)
    _key(manifest, "chat_template", "Jinja source text", lambda v: isinstance(v, str), optional=True)
    _key(manifest, "trained_steps", "a count of training steps", lambda v: _is_int(v) and v >= 0, optional=True)
    _key(manifest, "quantization", "a mapping describing the quantization", lambda v: isinstance(v, dict), optional=True)
    return config


def _files(manifest: dict) -> dict[str, dict]:
    files = _key(manifest, "files", "a mapping of each file's name to its sha256 and bytes", lambda v: isinstance(v, dict))
    for name, meta in files.items():
        if not _plain_name(name):
            raise _Wrong(f"key files lists {_shown(name)}, expected only names of files in the bundle directory")
        where = f"files[{_shown(name)}]"
        _mapping(meta, where, "a mapping with sha256 and bytes")
        _key(meta, "sha256", "64 lowercase hex digits", lambda v: isinstance(v, str) and SHA256.fullmatch(v) is not None,
             where=where)
        _key(meta, "bytes", "the file's size in bytes", lambda v: _is_int(v) and v >= 0, where=where)
    return files


def _model_config(manifest: dict) -> ModelConfig:
    settings = _key(manifest, "model_config", "a mapping of the model's settings", lambda v: isinstance(v, dict))
    try:
        return ModelConfig.from_dict(settings)
    except SpeedError as exc:
        raise _Wrong(f"key model_config is not a valid model config ({exc})") from None


def _embedding(manifest: dict, files: dict[str, dict], config: ModelConfig) -> None:
    """(V, d) rows of float32, of int8 with one float32 scale per row, or of q8_0: bytes q + 128 with one float32
    scale per block of 32 (a GGUF file's Q8_0 table, which the head reads as its 8-bit weights)."""
    spec = _mapping(manifest.get("embedding", _MISSING), "embedding", "a mapping with file, shape and dtype")
    shape = [config.vocab_size, config.d_model]
    _key(spec, "shape", f"{shape} (model_config's vocab_size, d_model)",
         lambda v: isinstance(v, list) and all(_is_int(n) for n in v) and v == shape, where="embedding")
    dtype = _key(spec, "dtype", _one_of(tuple(EMBEDDING_DTYPES)), lambda v: isinstance(v, str) and v in EMBEDDING_DTYPES,
                 where="embedding")
    _size(files, _file(spec, "file", files, "embedding"), math.prod(shape) * EMBEDDING_DTYPES[dtype],
          f"embedding.shape {shape} of {dtype}")
    if dtype == "int8" or "row_scales" in spec:
        _size(files, _file(spec, "row_scales", files, "embedding"), 4 * config.vocab_size,
              f"one float32 scale per row of {config.vocab_size}")
    if dtype == "q8_0" or "block_scales" in spec:
        if config.d_model % SCALE_BLOCK:
            raise _Wrong(f"embedding.dtype q8_0 needs d_model a multiple of {SCALE_BLOCK}, got {config.d_model}")
        _size(files, _file(spec, "block_scales", files, "embedding"), 4 * math.prod(shape) // SCALE_BLOCK,
              f"one float32 scale per {SCALE_BLOCK} values of {shape}")


def _exits(manifest: dict, files: dict[str, dict], config: ModelConfig) -> None:
    """Per early stage a one-layer graph (layer), or one table of all early stages' maps (low-rank, affine)."""
    spec = _optional_mapping(manifest, "exits", "a mapping with kind, stages and files, or null")
    if not spec:
        return
    kind = _key(spec, "kind", _one_of(EXIT_KINDS), lambda v: isinstance(v, str) and v in EXIT_KINDS, where="exits")
    early = config.n_stages - 1
    expected = f"a non-empty list of distinct early stages, each from 0 to {early - 1}" if early else \
        "no exits at all: the model has a single stage"
    stages = _key(spec, "stages", expected, lambda v: isinstance(v, list) and v != []
                  and all(_is_int(s) and 0 <= s < early for s in v) and len(set(v)) == len(v), where="exits")
    count = len(stages) if kind == "layer" else 1
    names = _key(spec, "files", f"a list of {count} file name(s), {'one per stage' if count > 1 else 'the table'}",
                 lambda v: isinstance(v, list) and len(v) == count, where="exits")
    for i in range(count):
        _file(names, i, files, "exits.files")
    if kind == "layer":
        return
    d = config.d_model
    if kind == "low-rank":
        rank = _key(spec, "rank", "a rank of at least 1", lambda v: _is_int(v) and v >= 1, where="exits")
        per_stage = 2 * d * rank  # (d, rank) down, then (rank, d) up
    else:
        per_stage = d * d + d  # (d, d) map, then (d,) bias
    _size(files, names[0], 4 * len(stages) * per_stage, f"{len(stages)} {kind} exit(s) of float32")


def _guess_head(manifest: dict, files: dict[str, dict]) -> None:
    spec = _optional_mapping(manifest, "guess_head", "a mapping with graph and tokens, or null")
    if not spec:
        return
    _file(spec, "graph", files, "guess_head")
    tokens = _file(spec, "tokens", files, "guess_head")
    if files[tokens]["bytes"] == 0 or files[tokens]["bytes"] % 8:
        raise _Wrong(f"key files[{_shown(tokens)}].bytes is {files[tokens]['bytes']}, expected a whole, non-zero "
                     "number of int64 token ids (a multiple of 8)")


# --- reading one key ---------------------------------------------------------------------------------------

_MISSING = object()


def _key(parent: dict | list | None, key: str | int, expected: str, ok: Callable[[Any], bool], *, where: str = "",
         optional: bool = False) -> Any:
    """parent[key] when `ok` accepts it; None for a missing optional key (or no parent at all)."""
    if parent is None:
        return None
    path = _path(where, key)
    present = key < len(parent) if isinstance(parent, list) else key in parent
    if not present:
        if optional:
            return None
        raise _Wrong(f"key {path} is missing, expected {expected}")
    value = parent[key]
    if not ok(value):
        raise _Wrong(f"key {path} is {_shown(value)}, expected {expected}")
    return value


def _mapping(value: Any, path: str, expected: str) -> dict:
    if value is _MISSING:
        raise _Wrong(f"key {path} is missing, expected {expected}")
    if not isinstance(value, dict):
        raise _Wrong(f"key {path} is {_shown(value)}, expected {expected}")
    return value


def _optional_mapping(manifest: dict, key: str, expected: str) -> dict | None:
    """An optional section: absent, null and {} all mean none."""
    return _key(manifest, key, expected, lambda v: v is None or isinstance(v, dict), optional=True) or None


def _file(parent: dict | list, key: str | int, files: dict[str, dict], where: str = "") -> str:
    """A name that must be one of the listed (and so hashed) files."""
    listed = 'the name of a file listed in "files"'
    return _key(parent, key, listed, lambda v: isinstance(v, str) and v in files, where=where)


def _size(files: dict[str, dict], name: str, expected: int, what: str) -> None:
    if files[name]["bytes"] != expected:
        raise _Wrong(f"key files[{_shown(name)}].bytes is {files[name]['bytes']}, expected {expected} ({what})")


def _path(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _plain_name(name: str) -> bool:
    """A file directly in the bundle directory, other than the manifest, that this system can name."""
    if name in ("", ".", "..", MANIFEST_FILE) or "/" in name or not name.isprintable():
        return False
    try:
        return len(os.fsencode(name)) <= MAX_NAME_BYTES
    except UnicodeEncodeError:  # e.g. a lone surrogate, which this system's file names cannot hold
        return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _one_of(values: tuple[str, ...]) -> str:
    quoted = [json.dumps(v) for v in values]
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _shown(value: Any, limit: int = 60) -> str:
    """The value as JSON, cut to `limit` characters."""
    try:
        text = json.dumps(value)
    except ValueError:
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

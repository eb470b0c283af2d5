"""The on-disk cache of one machine (models fetched once, the quality reference, measured
bandwidths): where it is, a lock per entry for parallel jobs, and writes that are never seen
half-done."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """FALCON_EXP_CACHE, else $XDG_CACHE_HOME/falcon_exp, else ~/.cache/falcon_exp."""
    root = os.environ.get("FALCON_EXP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "falcon_exp"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) between processes of one machine."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def locked(name: str) -> contextlib.AbstractContextManager[None]:
    """Serialise work on one cache entry between parallel jobs on one machine."""
    return file_lock(cache_dir() / f".{name}.lock")


@contextlib.contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """A staging path to write; on success it replaces `path` whole (readers see old or new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield staging
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def content_hash(content: Any, length: int = 32) -> str:
    """A short, stable hash of JSON-able content: the identities that resume, the model cache and
    the cache's entries are keyed on."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:length]

"""One-line checks of a config value: each names the key, the bad value and what is allowed."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from falcon_exp.errors import ConfigError


def one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        choices = ", ".join(str(a) for a in allowed)
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {choices}")


def integer(key: str, value: Any, minimum: int = 1, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if optional else "")
        raise ConfigError(f"{key}={value!r} is not allowed; it must be {allowed}")


def boolean(key: str, value: Any) -> None:
    """Hydra reads true/false (any case) as booleans; any other word stays a string, which
    Python would take as true: refused, so a run is never logged as given but run otherwise."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not allowed; choose true or false")


MEMORY_SIZE = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B)?", re.IGNORECASE)


def memory_caps(caps: Any) -> None:
    """max_memory as accelerate takes it: null, or a mapping of devices (a GPU index, cpu, disk)
    to sizes (bytes, or a number with KB/MB/GB/TB or KiB/MiB/GiB/TiB)."""
    if caps is None:
        return
    allowed = "null, or a mapping of devices (a GPU index, cpu, disk) to sizes such as 70GiB, e.g. {0: 70GiB, cpu: 100GiB}"
    if not isinstance(caps, dict) or not caps:
        raise ConfigError(f"max_memory={caps!r} is not allowed; give {allowed}")
    for device, size in caps.items():
        device_ok = (isinstance(device, int) and not isinstance(device, bool) and device >= 0) or device in ("cpu", "disk")
        size_ok = (isinstance(size, int) and not isinstance(size, bool) and size > 0) or (
            isinstance(size, str) and MEMORY_SIZE.fullmatch(size.strip()) is not None)
        if not device_ok or not size_ok:
            raise ConfigError(f"max_memory={caps!r} is not allowed: {device!r}: {size!r}; give {allowed}")


def writable_folder(named: str, folder: Path, advice: str) -> None:
    """`folder` is a folder that can be written, or can be made where it is asked (nothing is made
    here); `named` is how the user gave it (`--out 'figures'`, `hydra.run.dir='outputs/...'`)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{named} is a file, not a folder; {advice}")
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "Read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else f"{existing} is not writable"
        raise ConfigError(f"{named} cannot be written ({why}); {advice}")


def readable_text(key: str, path: Any) -> None:
    """A UTF-8 text file that exists and holds something."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key}={path!r} is not allowed; give the path of a plain-text file, or null")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{key}={path!r} cannot be read as UTF-8 text ({getattr(error, 'strerror', None) or error})") from None
    if not text.strip():
        raise ConfigError(f"{key}={path!r} holds no text")


def installed(module: str) -> bool:
    """Whether a module can be imported, without importing it (one set to None in sys.modules cannot)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:
        return False

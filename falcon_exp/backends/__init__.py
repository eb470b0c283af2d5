"""The quantization methods, one module each (base.py says what a module holds); torch-free.

Adding a method: a module here that registers a `Backend`, its config node in
conf/backend/<name>.yaml (and one line in conf/config.yaml's defaults), its tests and its docs.
"""

from __future__ import annotations

from falcon_exp.backends import bitsandbytes, hqq, marlin, torchao  # noqa: F401 - each registers itself
from falcon_exp.backends.base import REGISTRY, Backend, Mode
from falcon_exp.errors import ConfigError
from falcon_exp.schema import Metric

__all__ = ["Backend", "Mode", "get", "names", "modes", "metrics", "tags", "conditional", "packages", "tested"]


def names() -> tuple[str, ...]:
    """The backends in the order they came to falcon-exp (tables and figures follow it)."""
    return tuple(sorted(REGISTRY, key=lambda name: REGISTRY[name].since))


def get(name: str) -> Backend:
    if name not in REGISTRY:
        raise ConfigError(f"quantization.backend={name!r} is not allowed; choose one of: {', '.join(names())}")
    return REGISTRY[name]


def modes() -> list[Mode]:
    """Every quantized mode, fewest bits first, then in the backends' order."""
    return sorted((m for name in names() for m in REGISTRY[name].modes), key=lambda m: m.bits)


def metrics() -> dict[str, Metric]:
    return {m.key: m for b in REGISTRY.values() for m in b.metrics}


def tags() -> dict[str, str]:
    return {name: when for b in REGISTRY.values() for name, when in b.tags.items()}


def conditional() -> dict[str, str]:
    return {name: when for b in REGISTRY.values() for name, when in b.conditional.items()} | tags()


def packages() -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for b in REGISTRY.values() for p in b.packages))


def tested() -> dict[str, tuple[str, ...]]:
    """The libraries whose internals a backend patches or reads, with the versions it was tested with."""
    return {package: versions for b in REGISTRY.values() for package, versions in b.tested.items()}

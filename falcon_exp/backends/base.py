"""What a quantization method tells the rest of falcon-exp: the interface each backend module
implements, and the registry the runner, verification, decoder, tracking and analysis ask.

A backend module holds everything about its method: its settings (the config node
`quantization.<name>`, conf/backend/<name>.yaml) and their checks, its modes, how it quantizes (a
transformers config to load with, or a step after loading), what its layers must hold, the bytes
they store, whether a CUDA graph can hold them, and its own metrics and tags. Its top level is
torch-free, so that the config, the schema and the analysis can read the declarations.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from falcon_exp.schema import Metric

if TYPE_CHECKING:
    import torch

    from falcon_exp.config import JobConfig
    from falcon_exp.weights import Weights


@dataclass(frozen=True)
class Mode:
    """One way a backend stores weights: its bits, its scheme (the backend's own name for it) and
    the short mode name that runs, tables and figures carry."""

    bits: int
    scheme: str
    mode: str


class Backend:
    """A quantization method. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]  # the value of quantization.backend
    settings: ClassVar[type]  # a frozen dataclass of its config node; __post_init__ checks the values
    modes: ClassVar[tuple[Mode, ...]]  # every mode it can realise, in the order tables show them
    packages: ClassVar[tuple[str, ...]]  # distributions it imports (version tags, the install check)
    extra: ClassVar[str]  # the pip extra that installs them
    tested: ClassVar[dict[str, tuple[str, ...]]] = {}  # packages whose internals it relies on -> versions tested
    since: ClassVar[str]  # the falcon-exp release that brought it (compat.py keeps older runs' identities)
    former_keys: ClassVar[dict[str, str]] = {}  # 0.2's flat `quantization.<key>` -> its own setting
    metrics: ClassVar[tuple[Metric, ...]] = ()  # its own metrics
    tags: ClassVar[dict[str, str]] = {}  # its own tags -> when a run has them
    conditional: ClassVar[dict[str, str]] = {}  # its own metrics a run has only sometimes -> when
    quant_method: ClassVar[str | None] = None  # a checkpoint's `quant_method` that it reads
    replaces_linears: ClassVar[bool] = False  # its quantized layers are modules of its own, not nn.Linear

    def log_filters(self) -> list[tuple[str, logging.Filter]]:
        """Filters for its library's loggers (falcon_exp/console.py): lines that say nothing about a run."""
        return []

    # What a job asks of it (torch-free).
    def mode(self, bits: int, settings: Any) -> Mode:
        """The mode a job at these bits and settings realises (by default: its one mode of these bits)."""
        return next(m for m in self.modes if m.bits == bits)

    def knobs(self, bits: int) -> tuple[str, ...]:
        """Its settings that apply at these bits (the others are logged and change nothing)."""
        return tuple(f.name for f in dataclasses.fields(self.settings))

    def check(self, config: JobConfig, device: str, weights: Weights) -> None:
        """Refuse, as ConfigError, a request it cannot honour here (beyond being installed)."""

    def checkpoint_request(self, raw: dict, source: str, asked: Any) -> tuple[int, Any]:
        """A checkpoint's own quantization_config as bits and settings (`asked` with the ones it fixes)."""
        raise NotImplementedError

    # Quantizing and proving it (torch imported inside).
    def load_config(self, config: JobConfig, device: str) -> Any:
        """The quantization_config transformers loads with; None when it quantizes after loading."""
        return None

    def quantize(self, model: torch.nn.Module, config: JobConfig, device: str) -> None:
        """Quantize a loaded model in place (methods transformers cannot load with)."""

    def layers(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """The model's linear layers, its own quantized ones included."""
        import torch

        return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or (self.replaces_linears and self.is_quantized(m))]

    def is_quantized(self, module: torch.nn.Module) -> bool:
        raise NotImplementedError

    def findings(self, module: torch.nn.Module, config: JobConfig, device: str) -> tuple[dict, dict]:
        """What one layer must hold for the request, and what it holds: {property: value} each."""
        raise NotImplementedError

    def hint(self, key: str, found: Any, config: JobConfig) -> str:
        """A likely cause, where a layer's `key` was found otherwise than asked."""
        return ""

    def stored(self, module: torch.nn.Module) -> Iterator[torch.Tensor]:
        """Tensors one of its layers stores that are neither parameters nor buffers (scales, zero
        points); asked of every module of every model, so nothing for any other."""
        return iter(())

    def graph_blocker(self, config: JobConfig) -> str | None:
        """Why a CUDA graph cannot hold its layers for this request; None when it can."""
        return None

    def inductor_options(self, config: JobConfig) -> dict[str, Any]:
        """Inductor settings the fast path's compiled step needs for its layers; none: inductor's
        defaults, which every other method compiles with."""
        return {}

    def run_metrics(self, model: torch.nn.Module, config: JobConfig) -> dict[str, float]:
        """Its own metrics after the timed generations (by the names in `metrics`)."""
        return {}

    def run_tags(self, model: torch.nn.Module, config: JobConfig, device: str) -> dict[str, str]:
        """Its own tags (by the names in `tags`)."""
        return {}


REGISTRY: dict[str, Backend] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend choosable as quantization.backend=<its name>."""
    REGISTRY[cls.name] = cls()
    return cls

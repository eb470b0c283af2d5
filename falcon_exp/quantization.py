"""The proof that the loaded model is what was asked for, whatever the backend: its layers
compared one by one with the request (each backend says what its layers must hold,
falcon_exp/backends/), and the bytes they store.

transformers >= 5.5 swaps only modules whose type is exactly `nn.Linear` for bitsandbytes
layers. Falcon's `FalconLinear(nn.Linear)` computes the same product but fails that test, so a
Falcon model asked for in 4-bit silently loads in bf16. `quantizable_linears` builds such models
with plain `nn.Linear` layers (same weights, same maths) so they quantize; `verify` refuses any
model whose layers or footprint do not match the request.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from falcon_exp import backends
from falcon_exp.config import JobConfig
from falcon_exp.errors import FalconExpError
from falcon_exp.records import QuantizationReport

# Subclasses of nn.Linear whose forward is exactly nn.Linear's: module path -> class name.
LINEAR_TWINS = {"transformers.models.falcon.modeling_falcon": "FalconLinear"}
# Modules no backend quantizes (transformers keeps the output head unquantized).
KEEP_FULL_PRECISION = ("lm_head",)


def layers_to_quantize(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The plain linear layers a backend that quantizes after loading replaces: all but the head."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] not in KEEP_FULL_PRECISION]


class QuantizationNotRealised(FalconExpError):
    """The model that loaded is not the model that was asked for."""


@contextlib.contextmanager
def quantizable_linears() -> Iterator[None]:
    """While models are built inside, nn.Linear twins are built as plain nn.Linear."""
    saved = {}
    for module_name, class_name in LINEAR_TWINS.items():
        module = importlib.import_module(module_name)
        saved[module] = (class_name, getattr(module, class_name))
        setattr(module, class_name, torch.nn.Linear)
    try:
        yield
    finally:
        for module, (class_name, original) in saved.items():
            setattr(module, class_name, original)


def inspect(model: torch.nn.Module, config: JobConfig) -> QuantizationReport:
    method = config.quantization.method
    layers = method.layers(model)
    quantized = sum(method.is_quantized(m) for _, m in layers) if config.bits != 16 else 0
    realised = "none" if not quantized else f"{config.bits}bit"
    return QuantizationReport(len(layers), quantized, weights_bytes(model), realised)


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes a forward pass reads for weights: every parameter and buffer once (tied weights
    share storage), the tensors a backend's layers store beside them (scales, zero points), and
    for tensor subclasses (torchao's) the tensors they hold, not their logical size."""
    seen, total = set(), 0
    held = (t for module in model.modules() for method in backends.REGISTRY.values() for t in method.stored(module))
    for tensor in [*model.parameters(), *model.buffers(), *held]:
        for stored in stored_tensors(tensor):
            if stored.data_ptr() in seen:
                continue
            seen.add(stored.data_ptr())
            total += stored.numel() * stored.element_size()
    return total


def stored_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold a tensor's data: itself, or those inside a tensor subclass."""
    if not is_traceable_wrapper_subclass(tensor):
        yield tensor
        return
    for name in tensor.__tensor_flatten__()[0]:
        yield from stored_tensors(getattr(tensor, name))


def _plain_findings(module: torch.nn.Module, config: JobConfig) -> tuple[dict, dict]:
    """The unquantized baseline's layer: a plain linear layer, its weight in `dtype`."""
    weight = module.weight
    plain = type(module) is torch.nn.Linear and not is_traceable_wrapper_subclass(weight)
    return ({"layer": "plain", "weight dtype": getattr(torch, config.dtype)},
            {"layer": "plain" if plain else "quantized", "weight dtype": weight.dtype})


def verify(model: torch.nn.Module, config: JobConfig, device: str) -> QuantizationReport:
    """Refuse a model whose layers do not hold what was asked, compared layer by layer with the
    request (the backend's findings: layer class, storage and its bytes, group, scales, ...). A
    checkpoint that carries its own quantization_config makes transformers ignore the request;
    a backend that skips a layer it cannot take leaves it as it was: this finds both."""
    report = inspect(model, config)
    method = config.quantization.method
    layers = [(n, m) for n, m in method.layers(model) if n.split(".")[-1] not in KEEP_FULL_PRECISION]
    mismatches: dict[str, list] = {}
    for _, module in layers:
        asked, found = _plain_findings(module, config) if config.bits == 16 else method.findings(module, config, device)
        for key in asked:
            if asked[key] != found.get(key):
                mismatches.setdefault(key, [asked[key], found.get(key), 0])[2] += 1
    if mismatches:
        (key, (asked, found, count)), *others = mismatches.items()
        # other layer classes differ in everything else too; otherwise name what else differs
        more = f"; also {', '.join(k for k, _ in others)} differ" if others and key != "layer" else ""
        if config.bits != 16 and (hint := method.hint(key, found, config)):
            more += f" ({hint})"
        raise QuantizationNotRealised(
            f"asked for bits={config.bits} but the model loaded otherwise: {key} asked {_shown(asked)}, found "
            f"{_shown(found)} in {count} of {len(layers)} linear layers{more} (weights {report.weights_bytes / 1e9:.4g} GB); "
            "refusing to log it"
        )
    return report


def _shown(value: object) -> str:
    return str(value).removeprefix("torch.")

"""bits -> BitsAndBytesConfig, and the proof that the loaded model is what was asked for.

transformers >= 5.5 swaps only modules whose type is exactly `nn.Linear` for bitsandbytes
layers. Falcon's `FalconLinear(nn.Linear)` computes the same product but fails that test, so a
Falcon model asked for in 4-bit silently loads in bf16. `quantizable_linears` builds such models
with plain `nn.Linear` layers (same weights, same maths) so they quantize; `verify` refuses any
model whose layers or footprint do not match the request.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch

from falcon_exp.config import FalconExpError, QuantizationConfig

# Subclasses of nn.Linear whose forward is exactly nn.Linear's: module path -> class name.
LINEAR_TWINS = {"transformers.models.falcon.modeling_falcon": "FalconLinear"}
# Modules bitsandbytes leaves in full precision (transformers keeps the output head unquantized).
KEEP_FULL_PRECISION = ("lm_head",)


class _Once(logging.Filter):
    """bitsandbytes logs that int8 inputs are cast to float16 at every matmul (tens of thousands
    of lines per job); each distinct message is worth reading once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        first = message not in self.seen
        self.seen.add(message)
        return first


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_Once())


class QuantizationNotRealised(FalconExpError):
    """The model that loaded is not the model that was asked for."""


def bnb_config(quant: QuantizationConfig):
    """The BitsAndBytesConfig for a request; None for the unquantized baseline."""
    from transformers import BitsAndBytesConfig

    if quant.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
            bnb_4bit_use_double_quant=quant.double_quant,
        )
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(quant.int8_threshold))
    return None


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


@dataclass(frozen=True)
class QuantizationReport:
    """What the loaded model really is."""

    linear_layers: int
    quantized_layers: int
    weights_bytes: int
    realised: str  # "4bit", "8bit" or "none"


def inspect(model: torch.nn.Module) -> QuantizationReport:
    import bitsandbytes as bnb

    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    four = sum(isinstance(m, bnb.nn.Linear4bit) for _, m in linear)
    eight = sum(isinstance(m, bnb.nn.Linear8bitLt) for _, m in linear)
    realised = "4bit" if four else "8bit" if eight else "none"
    return QuantizationReport(len(linear), four + eight, weights_bytes(model), realised)


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes a forward pass reads for weights: every parameter and buffer once (tied weights
    share storage), plus bitsandbytes' quantization scales, which are neither."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers(), *_quantization_scales(model)]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def _quantization_scales(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)  # 4-bit: absmax, its own absmax if nested
        while state is not None:
            yield from (t for t in (state.absmax, state.code) if t is not None)
            state = state.state2 if state.nested else None
        # 8-bit: one scale per output row, on the weight until the first forward moves it to the layer's state
        for holder in (weight, getattr(module, "state", None)):
            scb = getattr(holder, "SCB", None)
            if scb is not None:
                yield scb


def verify(model: torch.nn.Module, quant: QuantizationConfig) -> QuantizationReport:
    """Refuse a model whose linear layers are not quantized as asked."""
    report = inspect(model)
    expected = {4: "4bit", 8: "8bit", 16: "none"}[quant.bits]
    should = sum(
        1
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.split(".")[-1] in KEEP_FULL_PRECISION
    )
    if report.realised != expected:
        raise QuantizationNotRealised(
            f"asked for bits={quant.bits} but the model loaded as {report.realised} "
            f"({report.quantized_layers} of {report.linear_layers} linear layers quantized); refusing to log it"
        )
    if quant.bits != 16 and report.quantized_layers != should:
        raise QuantizationNotRealised(
            f"asked for bits={quant.bits} but only {report.quantized_layers} of the {should} linear layers "
            "outside the output head were quantized; refusing to log it"
        )
    return report

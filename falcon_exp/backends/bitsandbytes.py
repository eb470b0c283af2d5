"""bitsandbytes: 4-bit NF4/FP4 (QLoRA's Linear4bit) and 8-bit LLM.int8 (Linear8bitLt), loaded
through transformers' BitsAndBytesConfig. The article's method, and the first backend."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from falcon_exp.backends.base import Backend, Mode, register
from falcon_exp.checks import boolean, one_of
from falcon_exp.errors import ConfigError
from falcon_exp.schema import Metric

if TYPE_CHECKING:
    import torch

    from falcon_exp.config import JobConfig

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
# LLM.int8's outlier path, seen in each int8 layer's last matmul (the last timed decode step).
INT8_OUTLIER_LAYERS = "quant/int8_outlier_layers"
INT8_OUTLIER_COLUMNS = "quant/int8_outlier_columns"
TAG_CPU_KERNEL = "falcon_exp.bnb_cpu_kernel"


@dataclass(frozen=True)
class Settings:
    quant_type: str  # 4-bit: nf4 | fp4
    compute_dtype: str  # 4-bit: the matmul's dtype
    double_quant: bool  # 4-bit: quantize the quantization constants too
    int8_threshold: float  # 8-bit: LLM.int8's outlier threshold (0: no fp16 outlier path)

    def __post_init__(self) -> None:
        one_of("quantization.bitsandbytes.quant_type", self.quant_type, QUANT_TYPES)
        one_of("quantization.bitsandbytes.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        boolean("quantization.bitsandbytes.double_quant", self.double_quant)
        if isinstance(self.int8_threshold, bool) or not isinstance(self.int8_threshold, (int, float)) or self.int8_threshold < 0:
            raise ConfigError(f"quantization.bitsandbytes.int8_threshold={self.int8_threshold!r} is not allowed; it must be a number >= 0")


@register
class Bitsandbytes(Backend):
    name = "bitsandbytes"
    settings = Settings
    modes = (Mode(4, "nf4", "nf4"), Mode(4, "fp4", "fp4"), Mode(8, "llm.int8", "int8"))
    packages = ("bitsandbytes",)
    extra = "bitsandbytes"
    tested = {"bitsandbytes": ("0.50.2",)}  # its CPU kernels and log lines
    since = "0.1"
    former_keys = {k: k for k in ("quant_type", "compute_dtype", "double_quant", "int8_threshold")}
    metrics = (
        Metric(INT8_OUTLIER_LAYERS, "count", "int8 layers whose last matmul split off outlier columns to the fp16 path"),
        Metric(INT8_OUTLIER_COLUMNS, "count", "columns split off to the fp16 path, the mean over all int8 layers"),
    )
    conditional = {INT8_OUTLIER_LAYERS: "bitsandbytes in 8 bits with an outlier threshold above 0",
                   INT8_OUTLIER_COLUMNS: "as int8_outlier_layers"}
    tags = {TAG_CPU_KERNEL: "on a CPU run of bitsandbytes in 4 or 8 bits: which kernel a decode step runs"}
    quant_method = "bitsandbytes"

    def log_filters(self) -> list[tuple[str, logging.Filter]]:
        from falcon_exp.console import Once

        return [("bitsandbytes.autograd._functions", Once()), ("bitsandbytes.backends.cpu.ops", _KernelsHint())]

    def mode(self, bits: int, settings: Settings) -> Mode:
        return next(m for m in self.modes if m.bits == bits and (bits == 8 or m.scheme == settings.quant_type))

    def knobs(self, bits: int) -> tuple[str, ...]:
        return ("quant_type", "compute_dtype", "double_quant") if bits == 4 else ("int8_threshold",)

    def checkpoint_request(self, raw: dict, source: str, asked: Settings) -> tuple[int, Settings]:
        import dataclasses

        if raw.get("load_in_4bit") or raw.get("_load_in_4bit"):
            storage = raw.get("bnb_4bit_quant_storage") or "uint8"
            if storage != "uint8":
                raise ConfigError(f"{source} stores its 4-bit weights as {storage}; falcon-exp measures uint8 storage only")
            compute = str(raw.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch.")
            return 4, dataclasses.replace(asked, quant_type=raw.get("bnb_4bit_quant_type", "fp4"), compute_dtype=compute,
                                          double_quant=bool(raw.get("bnb_4bit_use_double_quant")))
        if raw.get("load_in_8bit") or raw.get("_load_in_8bit"):
            return 8, dataclasses.replace(asked, int8_threshold=float(raw.get("llm_int8_threshold", 6.0)))
        raise ConfigError(f"{source} has a bitsandbytes quantization_config in neither 4 nor 8 bits")

    def load_config(self, config: JobConfig, device: str) -> Any:
        import torch
        from transformers import BitsAndBytesConfig

        s = config.quantization.settings
        if config.bits == 4:
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=s.quant_type,
                                      bnb_4bit_compute_dtype=getattr(torch, s.compute_dtype), bnb_4bit_use_double_quant=s.double_quant)
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(s.int8_threshold))

    def is_quantized(self, module: torch.nn.Module) -> bool:
        import bitsandbytes as bnb

        return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))

    def findings(self, module: torch.nn.Module, config: JobConfig, device: str) -> tuple[dict, dict]:
        """Layer class, weight storage dtype and bytes, the quantization state: 4-bit data type,
        nested quantization and compute dtype; LLM.int8's threshold and row scales."""
        import torch

        weight, s = module.weight, config.quantization.settings
        if config.bits == 4:
            state = getattr(weight, "quant_state", None)
            shape = tuple(state.shape) if state is not None else tuple(weight.shape)
            asked = {"layer": "Linear4bit", "weight dtype": torch.uint8, "quant_state": "present", "quant_type": s.quant_type,
                     "double_quant": s.double_quant, "compute_dtype": getattr(torch, s.compute_dtype),
                     "weight bytes": -(-math.prod(shape) // 2)}
            found = {"layer": type(module).__name__, "weight dtype": weight.dtype,
                     "quant_state": "present" if state is not None else "absent",
                     "quant_type": getattr(state, "quant_type", None), "double_quant": bool(getattr(state, "nested", False)),
                     "compute_dtype": getattr(module, "compute_dtype", None), "weight bytes": weight.numel() * weight.element_size()}
            return asked, found
        state = getattr(module, "state", None)
        scales = getattr(weight, "SCB", None) if getattr(weight, "SCB", None) is not None else getattr(state, "SCB", None)
        asked = {"layer": "Linear8bitLt", "weight dtype": torch.int8, "row scales": "present",
                 "int8_threshold": float(s.int8_threshold), "weight bytes": math.prod(weight.shape)}
        found = {"layer": type(module).__name__, "weight dtype": weight.dtype, "row scales": "present" if scales is not None else "absent",
                 "int8_threshold": float(getattr(state, "threshold", float("nan"))), "weight bytes": weight.numel() * weight.element_size()}
        return asked, found

    def stored(self, module: torch.nn.Module) -> Iterator[torch.Tensor]:
        """4-bit: the blocks' absmax (and its own absmax if nested); 8-bit: one scale per output
        row, on the weight until the first forward moves it to the layer's state."""
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        while state is not None:
            yield from (t for t in (state.absmax, state.code) if t is not None)
            state = state.state2 if state.nested else None
        for holder in (weight, getattr(module, "state", None)):
            scb = getattr(holder, "SCB", None)
            if scb is not None:
                yield scb

    def graph_blocker(self, config: JobConfig) -> str | None:
        threshold = config.quantization.settings.int8_threshold
        if config.bits == 8 and threshold > 0:
            return (f"LLM.int8 with int8_threshold={threshold} looks for outlier columns on the host "
                    "at every matmul (a device-to-host sync), which a CUDA graph cannot hold; int8_threshold=0 avoids it")
        return None

    def run_metrics(self, model: torch.nn.Module, config: JobConfig) -> dict[str, float]:
        """What LLM.int8's outlier decomposition did in each int8 layer's last matmul: how many
        layers split off outlier columns to the fp16 path, and the mean count of those columns.
        Empty without int8 layers or with the threshold at 0 (no decomposition)."""
        import bitsandbytes as bnb

        states = [m.state for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt) and m.state.threshold > 0]
        if not states:
            return {}
        columns = [0 if s.idx is None else s.idx.numel() for s in states]
        return {INT8_OUTLIER_LAYERS: sum(c > 0 for c in columns), INT8_OUTLIER_COLUMNS: sum(columns) / len(columns)}

    def run_tags(self, model: torch.nn.Module, config: JobConfig, device: str) -> dict[str, str]:
        """Which kernel a batch-1 decode step runs on this CPU: CPU timings of nf4 and int8 depend
        on it more than on anything else, and CPUs differ (AVX-512, AVX-512-BF16)."""
        return {TAG_CPU_KERNEL: cpu_kernel(config)} if device == "cpu" else {}


class _KernelsHint(logging.Filter):
    """On CPUs with AVX512-BF16, bitsandbytes warns at import that the optional `kernels` package
    (a fused 4-bit GEMM fetched from the Hugging Face hub) is missing, and then runs its own native
    kernel, which is no fault: said once, as information, with what runs instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "kernels-community" in record.getMessage():
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = ("the optional `kernels` package (a 4-bit CPU GEMM from the Hugging Face hub) is absent; "
                                       f"bitsandbytes' native AVX512-BF16 kernel runs (tag {TAG_CPU_KERNEL})"), ()
        return True


def cpu_kernel(config: JobConfig) -> str:
    import bitsandbytes.backends.cpu.ops as cpu
    import torch
    from bitsandbytes.functional import has_avx512bf16

    capability = torch.backends.cpu.get_cpu_capability()
    if config.bits == 4:
        if not has_avx512bf16():
            compute = config.quantization.settings.compute_dtype
            return f"4-bit: dequantize, then a {compute} matmul (bitsandbytes' default; CPU {capability}, no AVX512-BF16)"
        if getattr(cpu, "gemm_4bit_forward_kernel", None) is not None:
            return "4-bit: fused gemm_4bit_forward (kernels-community hub kernel, AVX512-BF16)"
        return "4-bit: fused gemv_4bit_inference_cpu (bitsandbytes' native library, AVX512-BF16)"
    if getattr(cpu, "_has_avx512", False):
        return "int8: torch._int_mm (AVX-512)"
    return f"int8: a float32 matmul of the int8 values (bitsandbytes' default; CPU {capability}, no AVX-512)"

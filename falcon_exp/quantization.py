"""bits and backend -> the quantization config transformers loads with (bitsandbytes' or
torchao's), and the proof that the loaded model is what was asked for.

transformers >= 5.5 swaps only modules whose type is exactly `nn.Linear` for bitsandbytes
layers. Falcon's `FalconLinear(nn.Linear)` computes the same product but fails that test, so a
Falcon model asked for in 4-bit silently loads in bf16. `quantizable_linears` builds such models
with plain `nn.Linear` layers (same weights, same maths) so they quantize; `verify` refuses any
model whose layers or footprint do not match the request. torchao keeps `nn.Linear` and swaps its
weight for a tensor subclass whose `numel()` and dtype are the unquantized ones: its bytes are
counted from the tensors inside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from falcon_exp.config import JobConfig, QuantizationConfig
from falcon_exp.errors import ConfigError, FalconExpError
from falcon_exp.records import QuantizationReport

# Subclasses of nn.Linear whose forward is exactly nn.Linear's: module path -> class name.
LINEAR_TWINS = {"transformers.models.falcon.modeling_falcon": "FalconLinear"}
# Modules bitsandbytes leaves in full precision (transformers keeps the output head unquantized).
KEEP_FULL_PRECISION = ("lm_head",)


class QuantizationNotRealised(FalconExpError):
    """The model that loaded is not the model that was asked for."""


def quantization_config(config: JobConfig, device: str) -> Any:
    """What transformers loads the job's weights with: its backend's config; None unquantized."""
    if config.bits == 16:
        return None
    return torchao_config(config, device) if config.quantization.backend == "torchao" else bnb_config(config)


# torchao's layouts by scheme and device: (its config, the weight's tensor subclass). int4 has one
# kernel family per device: tinygemm's tile-packed layout on CUDA, the opaque CPU layout (a torchao
# prototype) on the CPU. set_inductor_config=False: torchao's recommended inductor settings turn on
# coordinate-descent autotuning, under which the fast path's compile of Falcon-7B ran past three
# minutes on an H200; every backend's fast path compiles with the same inductor defaults.
def _torchao_scheme(config: JobConfig, device: str) -> tuple[Any, str]:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    quant = config.quantization
    if config.bits == 4 and device == "cuda":
        return (Int4WeightOnlyConfig(group_size=quant.group_size, int4_packing_format="tile_packed_to_4d", set_inductor_config=False),
                "Int4TilePackedTo4dTensor")
    if config.bits == 4:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=quant.group_size, set_inductor_config=False), "Int4OpaqueTensor"
    return {"int8": (Int8WeightOnlyConfig(set_inductor_config=False), "Int8Tensor"),
            "float8": (Float8WeightOnlyConfig(set_inductor_config=False), "Float8Tensor"),
            "float8_dynamic": (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False), "Float8Tensor"),
            }[quant.torchao_8bit]


def torchao_config(config: JobConfig, device: str) -> Any:
    from transformers import TorchAoConfig

    return TorchAoConfig(_torchao_scheme(config, device)[0])


def bnb_config(config: JobConfig) -> Any:
    """The BitsAndBytesConfig for a job's request; None for the unquantized baseline."""
    from transformers import BitsAndBytesConfig

    quant = config.quantization
    if config.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
            bnb_4bit_use_double_quant=quant.double_quant,
        )
    if config.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(quant.int8_threshold))
    return None


def request_of_checkpoint(raw: dict, source: str, asked: QuantizationConfig) -> tuple[int, QuantizationConfig]:
    """A checkpoint's own `quantization_config` (its config.json) as the request it amounts to:
    its bits, and `asked` with the settings it fixes replaced."""
    method = raw.get("quant_method")
    if method != "bitsandbytes":
        raise ConfigError(f"{source} holds {method} weights; falcon-exp measures bitsandbytes 4- and 8-bit weights only")
    if raw.get("load_in_4bit") or raw.get("_load_in_4bit"):
        storage = raw.get("bnb_4bit_quant_storage") or "uint8"
        if storage != "uint8":
            raise ConfigError(f"{source} stores its 4-bit weights as {storage}; falcon-exp measures uint8 storage only")
        compute = str(raw.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch.")
        return 4, dataclasses.replace(asked, backend="bitsandbytes", quant_type=raw.get("bnb_4bit_quant_type", "fp4"),
                                      compute_dtype=compute, double_quant=bool(raw.get("bnb_4bit_use_double_quant")))
    if raw.get("load_in_8bit") or raw.get("_load_in_8bit"):
        return 8, dataclasses.replace(asked, backend="bitsandbytes", int8_threshold=float(raw.get("llm_int8_threshold", 6.0)))
    raise ConfigError(f"{source} has a bitsandbytes quantization_config in neither 4 nor 8 bits")


def differences(asked: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """`key asked X, found Y` for each setting (config.knobs) that applies to either and differs."""
    return [f"{k} asked {asked.get(k, '-')}, found {found.get(k, '-')}" for k in dict.fromkeys([*asked, *found])
            if asked.get(k) != found.get(k)]


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


def cpu_kernel(config: JobConfig) -> str | None:
    """Which bitsandbytes kernel a batch-1 decode step runs on this CPU: CPU timings of nf4 and
    int8 depend on it more than on anything else, and CPUs differ (AVX-512, AVX-512-BF16)."""
    if config.bits == 16 or config.quantization.backend != "bitsandbytes":
        return None
    import bitsandbytes.backends.cpu.ops as cpu
    from bitsandbytes.functional import has_avx512bf16

    capability = torch.backends.cpu.get_cpu_capability()
    if config.bits == 4:
        if not has_avx512bf16():
            return f"4-bit: dequantize, then a {config.quantization.compute_dtype} matmul (bitsandbytes' default; CPU {capability}, no AVX512-BF16)"
        if getattr(cpu, "gemm_4bit_forward_kernel", None) is not None:
            return "4-bit: fused gemm_4bit_forward (kernels-community hub kernel, AVX512-BF16)"
        return "4-bit: fused gemv_4bit_inference_cpu (bitsandbytes' native library, AVX512-BF16)"
    if getattr(cpu, "_has_avx512", False):
        return "int8: torch._int_mm (AVX-512)"
    return f"int8: a float32 matmul of the int8 values (bitsandbytes' default; CPU {capability}, no AVX-512)"


def inspect(model: torch.nn.Module) -> QuantizationReport:
    import bitsandbytes as bnb

    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    torchao = [type(m.weight).__name__ for _, m in linear if is_traceable_wrapper_subclass(m.weight)]  # Int4..., Int8/Float8Tensor
    four = sum(isinstance(m, bnb.nn.Linear4bit) for _, m in linear) + sum(name.startswith("Int4") for name in torchao)
    eight = sum(isinstance(m, bnb.nn.Linear8bitLt) for _, m in linear) + sum(not name.startswith("Int4") for name in torchao)
    realised = "4bit" if four else "8bit" if eight else "none"
    return QuantizationReport(len(linear), four + eight, weights_bytes(model), realised)


def int8_outliers(model: torch.nn.Module) -> dict[str, float]:
    """What LLM.int8's outlier decomposition did in each int8 layer's last matmul: how many
    layers split off outlier columns to the fp16 path, and the mean count of those columns.
    Empty without int8 layers or with the threshold at 0 (no decomposition)."""
    import bitsandbytes as bnb

    from falcon_exp import schema

    states = [m.state for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt) and m.state.threshold > 0]
    if not states:
        return {}
    columns = [0 if s.idx is None else s.idx.numel() for s in states]
    return {schema.INT8_OUTLIER_LAYERS: sum(c > 0 for c in columns), schema.INT8_OUTLIER_COLUMNS: sum(columns) / len(columns)}


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes a forward pass reads for weights: every parameter and buffer once (tied weights
    share storage), plus bitsandbytes' quantization scales, which are neither, and for torchao's
    tensor subclasses the tensors they hold (data, scales, zero points), not their logical size."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers(), *_quantization_scales(model)]:
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


def _layer_findings(module: torch.nn.Module, config: JobConfig, torchao_subclass: str | None) -> dict[str, tuple]:
    """What one linear layer holds against what was asked: {property: (asked, found)} where they
    differ. `torchao_subclass`: the weight's tensor subclass a torchao request makes on this device."""
    import bitsandbytes as bnb

    weight, bits, quant = module.weight, config.bits, config.quantization
    if bits == 16:
        quantized = isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) or is_traceable_wrapper_subclass(weight)
        asked = {"layer": "plain", "weight dtype": getattr(torch, config.dtype)}
        found = {"layer": "quantized" if quantized else "plain", "weight dtype": weight.dtype}
    elif quant.backend == "torchao":
        asked, found = _torchao_findings(weight, config, torchao_subclass)
    elif bits == 4:
        state = getattr(weight, "quant_state", None)
        shape = tuple(state.shape) if state is not None else tuple(weight.shape)
        asked = {"layer": "Linear4bit", "weight dtype": torch.uint8, "quant_state": "present", "quant_type": quant.quant_type,
                 "double_quant": quant.double_quant, "compute_dtype": getattr(torch, quant.compute_dtype),
                 "weight bytes": -(-math.prod(shape) // 2)}
        found = {"layer": type(module).__name__, "weight dtype": weight.dtype,
                 "quant_state": "present" if state is not None else "absent",
                 "quant_type": getattr(state, "quant_type", None), "double_quant": bool(getattr(state, "nested", False)),
                 "compute_dtype": getattr(module, "compute_dtype", None), "weight bytes": weight.numel() * weight.element_size()}
    else:
        state = getattr(module, "state", None)
        scales = getattr(weight, "SCB", None) if getattr(weight, "SCB", None) is not None else getattr(state, "SCB", None)
        asked = {"layer": "Linear8bitLt", "weight dtype": torch.int8, "row scales": "present",
                 "int8_threshold": float(quant.int8_threshold), "weight bytes": math.prod(weight.shape)}
        found = {"layer": type(module).__name__, "weight dtype": weight.dtype, "row scales": "present" if scales is not None else "absent",
                 "int8_threshold": float(getattr(state, "threshold", float("nan"))), "weight bytes": weight.numel() * weight.element_size()}
    return {key: (asked[key], found[key]) for key in asked if asked[key] != found[key]}


def _torchao_findings(weight: torch.Tensor, config: JobConfig, subclass: str) -> tuple[dict, dict]:
    """torchao's weight against the request: its tensor subclass, the bytes of its data (int4: two
    weights a byte), the block a scale covers (int4: one row's group_size weights; 8-bit: one
    whole row, so that a per-tensor scale is refused), whether activations are quantized too."""
    rows, columns = weight.shape
    subclass_found = is_traceable_wrapper_subclass(weight)
    data = getattr(weight, "qdata", None) if subclass_found else None
    if subclass == "Int4TilePackedTo4dTensor":  # tinygemm's layout pads rows to 8 and columns to 1024 (the padding is read too)
        rows, columns = -(-rows // 8) * 8, -(-columns // 1024) * 1024
    asked = {"weight": subclass, "data bytes": rows * columns // (2 if config.bits == 4 else 1),
             "scale block": (1, config.quantization.group_size if config.bits == 4 else columns),
             "activations": "quantized" if config.scheme == "float8_dynamic_activation" else "as they are"}
    found = {"weight": type(weight).__name__, "data bytes": None if data is None else data.numel() * data.element_size(),
             "scale block": tuple(getattr(weight, "block_size", None) or ()) or None,
             "activations": "quantized" if getattr(weight, "act_quant_kwargs", None) is not None else "as they are"}
    return asked, found


def verify(model: torch.nn.Module, config: JobConfig, device: str) -> QuantizationReport:
    """Refuse a model whose layers do not hold what was asked, compared layer by layer with the
    request: layer class, weight storage dtype and bytes, quantization state, 4-bit data type,
    nested quantization and compute dtype, LLM.int8's threshold and row scales; for torchao the
    weight's tensor subclass, its data bytes, group size and activation quantization. A checkpoint
    that carries its own quantization_config makes transformers ignore the request; this finds it."""
    report = inspect(model)
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.split(".")[-1] not in KEEP_FULL_PRECISION]
    torchao_subclass = _torchao_scheme(config, device)[1] if config.quantization.backend == "torchao" and config.bits != 16 else None
    mismatches: dict[str, list] = {}
    for _, module in layers:
        for key, (asked, found) in _layer_findings(module, config, torchao_subclass).items():
            mismatches.setdefault(key, [asked, found, 0])[2] += 1
    if mismatches:
        (key, (asked, found, count)), *others = mismatches.items()
        # other layer classes differ in everything else too; otherwise name what else differs
        more = f"; also {', '.join(k for k, _ in others)} differ" if others and key != "layer" else ""
        if config.quantization.backend == "torchao" and config.bits == 4 and found == "Parameter":
            group = config.quantization.group_size
            more += f" (torchao leaves a layer unquantized when quantization.group_size={group} does not divide its input width)"
        raise QuantizationNotRealised(
            f"asked for bits={config.bits} but the model loaded otherwise: {key} asked {_shown(asked)}, found "
            f"{_shown(found)} in {count} of {len(layers)} linear layers{more} (weights {report.weights_bytes / 1e9:.4g} GB); "
            "refusing to log it"
        )
    return report


def _shown(value: object) -> str:
    return str(value).removeprefix("torch.")

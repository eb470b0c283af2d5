"""HQQ (Half-Quadratic Quantization, Badri and Shaji 2023): calibration-free 4- and 8-bit weights
with a zero point and a scale per group, fitted by a half-quadratic solver. transformers'
HqqConfig path does not load in 5.17-5.24 (its quantizer has no `get_quantize_ops`), so the
model loads unquantized and every linear layer but the output head is replaced by hqq's own
`HQQLinear` after loading.

Kernels: on the CPU, and wherever no faster one applies, hqq's torch backend (dequantize the
layer, then a matmul). On a GPU, 4-bit with axis=1 in bfloat16 runs tinygemm's int4 kernel
(the layer of hqq's `torchao_int4` backend, built layer by layer rather than through
prepare_for_inference, which turns on inductor settings the project keeps off). The tag
falcon_exp.hqq_kernel names the kernel that ran.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from falcon_exp.backends.base import Backend, Mode, register
from falcon_exp.checks import one_of
from falcon_exp.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from falcon_exp.config import JobConfig
    from falcon_exp.weights import Weights

GROUP_SIZES = (32, 64, 128)
AXES = (0, 1)  # the dimension a group runs along: 1 (input) is the one GPU kernels take
TAG_KERNEL = "falcon_exp.hqq_kernel"
TORCH_KERNEL = "hqq torch backend: dequantize, then a matmul"
TINYGEMM_KERNEL = "torchao tinygemm int4 (hqq's torchao_int4 backend)"


@dataclass(frozen=True)
class Settings:
    group_size: int  # weights per scale and zero point
    axis: int  # 1: groups along a row (the input dimension); 0: along a column

    def __post_init__(self) -> None:
        one_of("quantization.hqq.group_size", self.group_size, GROUP_SIZES)
        one_of("quantization.hqq.axis", self.axis, AXES)


@register
class Hqq(Backend):
    name = "hqq"
    settings = Settings
    modes = (Mode(4, "hqq_4bit", "hqq4"), Mode(8, "hqq_8bit", "hqq8"))
    packages = ("hqq",)
    extra = "hqq"
    tested = {"hqq": ("0.2.8.post1",)}  # its layers' metadata, and its version check (_tinygemm_layer)
    since = "0.3"
    tags = {TAG_KERNEL: "on an hqq run: the kernel its layers ran"}
    replaces_linears = True

    def check(self, config: JobConfig, device: str, weights: Weights) -> None:
        """Its groups tile every layer it quantizes: with axis=1 a group is part of a row, so the
        group size must divide the input width (else a group would straddle two rows); with axis=0
        hqq groups the flattened weights, so it must divide their count."""
        from falcon_exp.weights import quantized_layer_shapes

        settings = config.quantization.settings
        shapes = quantized_layer_shapes(weights)
        sizes = {shape[1] for shape in shapes} if settings.axis == 1 else {shape[0] * shape[1] for shape in shapes}
        if undivided := sorted(w for w in sizes if w % settings.group_size):
            fitting = [g for g in GROUP_SIZES if all(w % g == 0 for w in sizes)]
            what = "layer input width" if settings.axis == 1 else "layer weight count"
            raise ConfigError(f"quantization.hqq.group_size={settings.group_size} does not divide {config.model.name}'s {what} "
                              f"{', '.join(map(str, undivided))} (quantization.hqq.axis={settings.axis}); "
                              f"allowed here: {', '.join(map(str, fitting)) or 'none'}")

    def quantize(self, model: torch.nn.Module, config: JobConfig, device: str) -> None:
        import torch
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        from falcon_exp.quantization import layers_to_quantize

        settings, dtype = config.quantization.settings, getattr(torch, config.dtype)
        quant_config = BaseQuantizeConfig(nbits=config.bits, group_size=settings.group_size, axis=settings.axis)
        for name, linear in layers_to_quantize(model):
            parent, _, child = name.rpartition(".")
            where = linear.weight.device  # HQQLinear drops the layer's own weight
            if _tinygemm_applies(config, where.type):
                layer = _tinygemm_layer(linear, quant_config, where)
            else:
                layer = HQQLinear(linear, quant_config, compute_dtype=dtype, device=str(where))
            setattr(model.get_submodule(parent), child, layer)

    def is_quantized(self, module: torch.nn.Module) -> bool:
        return type(module).__name__ in ("HQQLinear", "HQQLinearTorchWeightOnlynt4")

    def findings(self, module: torch.nn.Module, config: JobConfig, device: str) -> tuple[dict, dict]:
        """Layer class, bits, group size, axis and compute dtype as the layer's own metadata says,
        and the bytes of its packed weights (bits/8 a weight; tinygemm's layout pads the input
        width to a multiple of 1024)."""
        import torch

        settings, dtype = config.quantization.settings, getattr(torch, config.dtype)
        tinygemm = _tinygemm_applies(config, device)
        asked = {"layer": "HQQLinearTorchWeightOnlynt4" if tinygemm else "HQQLinear", "bits": config.bits,
                 "group_size": settings.group_size, "axis": settings.axis, "compute_dtype": dtype}
        if type(module).__name__ == "HQQLinearTorchWeightOnlynt4":
            shape = (module.out_features, module.origin_in_features)
            found = {"bits": module.nbits, "group_size": module.groupsize, "axis": module.axis, "weight bytes": _bytes(module.weight_int4pack)}
        elif type(module).__name__ == "HQQLinear":
            meta = module.meta
            shape = tuple(meta["shape"])
            found = {"bits": meta["nbits"], "group_size": meta["group_size"], "axis": meta["axis"], "weight bytes": _bytes(module.W_q)}
        else:
            shape = tuple(module.weight.shape)
            found = {"bits": 16, "group_size": None, "axis": None, "weight bytes": _bytes(module.weight)}
        if tinygemm:  # its layout pads the input width to a multiple of 1024 (the padding is read too)
            shape = (shape[0], -(-shape[1] // 1024) * 1024)
        asked["weight bytes"] = math.prod(shape) * config.bits // 8
        compute = module.compute_dtype if self.is_quantized(module) else module.weight.dtype
        found |= {"layer": type(module).__name__, "compute_dtype": compute}
        return asked, found

    def stored(self, module: torch.nn.Module) -> Iterator[torch.Tensor]:
        """The packed weights, scales and zero points (kept in `meta` or as plain attributes,
        neither parameters nor buffers)."""
        import torch

        if not self.is_quantized(module):
            return
        held = list(vars(module).values()) + list((getattr(module, "meta", None) or {}).values())
        yield from (t for t in held if isinstance(t, torch.Tensor))

    def run_tags(self, model: torch.nn.Module, config: JobConfig, device: str) -> dict[str, str]:
        return {TAG_KERNEL: TINYGEMM_KERNEL if _tinygemm_applies(config, device) else TORCH_KERNEL}


def _tinygemm_applies(config: JobConfig, device: str) -> bool:
    """Whether tinygemm's int4 kernel takes these layers: a GPU, 4 bits, groups along rows, bfloat16."""
    return device == "cuda" and config.bits == 4 and config.quantization.settings.axis == 1 and config.dtype == "bfloat16"


def _tinygemm_layer(linear: torch.nn.Module, quant_config: dict, where: torch.device) -> torch.nn.Module:
    """A linear layer quantized by HQQ straight into tinygemm's int4 layout (hqq's
    HQQLinearTorchWeightOnlynt4), its input width zero-padded to a multiple of 1024 as the kernel
    needs (Falcon-7B's 4544 is not one; hqq's conversion of an HQQLinear cannot pad). hqq 0.2.8
    packs the weights for torch >= 2.5 only when `float(torch.__version__[:3]) >= 2.5`, which reads
    torch 2.11 as 2.1 and skips the packing tinygemm needs (hqq/backends/torchao.py): torch's
    version reads as a 2.5 or later while it packs."""
    import torch
    from hqq.backends.torchao import HQQLinearTorchWeightOnlynt4

    layer = HQQLinearTorchWeightOnlynt4(None, quant_config, compute_dtype=torch.bfloat16, device=str(where), initialize=False,
                                        padding=True)
    layer.linear_layer = linear
    with _version_read_as("2.5" if torch.__version__ >= "2.5" else torch.__version__[:3]):
        return layer.initialize()


@contextlib.contextmanager
def _version_read_as(short: str) -> Iterator[None]:
    import torch

    class Version(type(torch.__version__)):
        def __getitem__(self, key: object) -> str:
            return short if key == slice(None, 3) else super().__getitem__(key)

    saved = torch.__version__
    torch.__version__ = Version(saved)
    try:
        yield
    finally:
        torch.__version__ = saved


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()

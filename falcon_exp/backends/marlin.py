"""Marlin: symmetric 4- and 8-bit weights in GPTQ's format (a scale per row and group, no zero
point), served on a CUDA GPU by vLLM's Marlin kernel, the batch-1-to-64 kernel GPTQ and AWQ
checkpoints are served with. The codes come from rounding to nearest (GPTQ's own format, without
its calibrated fit), so speed is GPTQ's and quality is a lower bound on it. Every linear layer but
the output head is replaced by a `MarlinLinear` after loading (falcon_exp/backends/marlin_kernel.py).

Kernels: on a GPU, Marlin from a compiled library (the one FALCON_EXP_MARLIN_LIBRARY names, else
gptqmodel's build), in bfloat16; on the CPU, the dequantized weights and a matmul (the same
values, for quality). The tag falcon_exp.marlin_kernel names the kernel that ran.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from falcon_exp.backends.base import Backend, Mode, register
from falcon_exp.checks import one_of
from falcon_exp.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from falcon_exp.config import JobConfig
    from falcon_exp.weights import Weights

GROUP_SIZES = (32, 64, 128, -1)  # -1: one scale per row (the kernel's channelwise case)
TAG_KERNEL = "falcon_exp.marlin_kernel"
CPU_KERNEL = "dequantize, then a matmul (CPU)"


@dataclass(frozen=True)
class Settings:
    group_size: int  # weights per scale along a row; -1: one scale per row

    def __post_init__(self) -> None:
        one_of("quantization.marlin.group_size", self.group_size, GROUP_SIZES)


@register
class Marlin(Backend):
    name = "marlin"
    settings = Settings
    modes = (Mode(4, "gptq_rtn_4bit", "marlin4"), Mode(8, "gptq_rtn_8bit", "marlin8"))
    packages = ()
    extra = ""
    since = "0.3"
    tags = {TAG_KERNEL: "on a marlin run: the kernel its layers ran"}
    replaces_linears = True

    def check(self, config: JobConfig, device: str, weights: Weights) -> None:
        """On a GPU: bfloat16 activations, the kernel there, a GPU of compute capability >= 8.0."""
        if device != "cuda":
            return
        import torch

        from falcon_exp.backends.marlin_kernel import LIBRARY_ENV, kernel_source

        if config.dtype != "bfloat16":
            raise ConfigError(f"quantization.backend=marlin computes in bfloat16 on a GPU (dtype={config.dtype}); "
                              "allowed here: dtype=bfloat16")
        try:
            source = kernel_source()
        except Exception as error:  # a library that does not load, or gptqmodel's build failing
            where = f"{LIBRARY_ENV}={os.environ[LIBRARY_ENV]}" if os.environ.get(LIBRARY_ENV) else "gptqmodel's build"
            raise ConfigError(f"{where} does not load as the Marlin library: {(str(error) or type(error).__name__).splitlines()[0]}") from None
        if source is None:
            raise ConfigError(f"quantization.backend=marlin on a GPU needs the Marlin kernel: {LIBRARY_ENV}=PATH of a library "
                              "built by experiments/gpu/build_marlin.py, or gptqmodel>=7.7 installed")
        if (capability := torch.cuda.get_device_capability()) < (8, 0):
            raise ConfigError(f"quantization.backend=marlin needs a GPU of CUDA compute capability >= 8.0 "
                              f"(found {capability[0]}.{capability[1]})")

    def quantize(self, model: torch.nn.Module, config: JobConfig, device: str) -> None:
        from falcon_exp.backends.marlin_kernel import MarlinLinear
        from falcon_exp.quantization import layers_to_quantize

        for name in [n for n, _ in layers_to_quantize(model)]:  # one layer at a time, so that each one's bf16 weight is freed as it is replaced
            parent, _, child = name.rpartition(".")
            layer = MarlinLinear(model.get_submodule(name), config.bits, config.quantization.settings.group_size)
            setattr(model.get_submodule(parent), child, layer)

    def is_quantized(self, module: torch.nn.Module) -> bool:
        return type(module).__name__ == "MarlinLinear"

    def findings(self, module: torch.nn.Module, config: JobConfig, device: str) -> tuple[dict, dict]:
        """Layer class, bits, group size and layout as the layer holds them, and the bytes of its
        codes and scales (Marlin's tiles pad the shape: the padding is stored and read)."""
        from falcon_exp.backends.marlin_kernel import layout_bytes, layout_on, padded_shape

        group = config.quantization.settings.group_size
        rows, columns = (module.out_features, module.in_features) if self.is_quantized(module) else tuple(module.weight.shape)
        asked = {"layer": "MarlinLinear", "bits": config.bits, "group_size": group, "layout": layout_on(device),
                 "stored bytes": layout_bytes(*padded_shape(rows, columns, group), config.bits, group)}
        if not self.is_quantized(module):
            return asked, {"layer": type(module).__name__, "bits": 16}
        return asked, {"layer": "MarlinLinear", "bits": module.bits, "group_size": module.group_size, "layout": module.layout,
                       "stored bytes": sum(t.numel() * t.element_size() for t in (module.qweight, module.scales))}

    def hint(self, key: str, found: Any, config: JobConfig) -> str:
        if key == "layout":
            return ("a layer device_map left on the CPU holds GPTQ's layout and cannot run Marlin's kernel: "
                    "give the GPU room for the whole model (max_memory), or run on the CPU")
        return ""

    def run_tags(self, model: torch.nn.Module, config: JobConfig, device: str) -> dict[str, str]:
        from falcon_exp.backends.marlin_kernel import kernel_source

        return {TAG_KERNEL: f"vLLM Marlin ({kernel_source()})" if device == "cuda" else CPU_KERNEL}

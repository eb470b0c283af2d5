"""torchao: int4 weight-only (tinygemm's tile-packed layout on CUDA, the opaque layout on the CPU),
int8 and float8 weight-only, float8 with dynamic activations; loaded through TorchAoConfig.

torchao keeps `nn.Linear` and swaps its weight for a tensor subclass whose `numel()` and dtype
are the unquantized ones: its bytes are counted from the tensors inside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from falcon_exp.backends.base import Backend, Mode, register
from falcon_exp.checks import one_of
from falcon_exp.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from falcon_exp.config import JobConfig
    from falcon_exp.weights import Weights

GROUP_SIZES = (32, 64, 128)  # those torchao's int4 kernels take on both CPU and CUDA
EIGHT_BIT = ("int8", "float8", "float8_dynamic")


@dataclass(frozen=True)
class Settings:
    group_size: int  # 4-bit: weights per scale
    eight_bit: str  # 8-bit: int8 | float8 (weight-only) | float8_dynamic (activations too)

    def __post_init__(self) -> None:
        one_of("quantization.torchao.group_size", self.group_size, GROUP_SIZES)
        one_of("quantization.torchao.eight_bit", self.eight_bit, EIGHT_BIT)


# The mode of each 8-bit scheme, by quantization.torchao.eight_bit.
EIGHT_BIT_MODES = {"int8": Mode(8, "int8_weight_only", "ao-int8"), "float8": Mode(8, "float8_weight_only", "ao-fp8"),
                   "float8_dynamic": Mode(8, "float8_dynamic_activation", "ao-fp8dyn")}


@register
class Torchao(Backend):
    name = "torchao"
    settings = Settings
    modes = (Mode(4, "int4_weight_only", "ao-int4"), *EIGHT_BIT_MODES.values())
    packages = ("torchao",)
    extra = "torchao"
    since = "0.2"
    former_keys = {"group_size": "group_size", "torchao_8bit": "eight_bit"}
    quant_method = None

    def log_filters(self) -> list[tuple[str, logging.Filter]]:
        from falcon_exp.console import Expected

        return [("torchao", Expected()), ("torchao.kernel.intmm", Expected())]

    def mode(self, bits: int, settings: Settings) -> Mode:
        return self.modes[0] if bits == 4 else EIGHT_BIT_MODES[settings.eight_bit]

    def knobs(self, bits: int) -> tuple[str, ...]:
        return ("group_size",) if bits == 4 else ("eight_bit",)

    def check(self, config: JobConfig, device: str, weights: Weights) -> None:
        """Its group divides every layer it quantizes (else torchao leaves the layer as it is), and
        float8 with dynamic activations runs on this device."""
        from falcon_exp.weights import quantized_layer_shapes

        settings = config.quantization.settings
        widths = {shape[1] for shape in quantized_layer_shapes(weights)} if config.bits == 4 else set()
        if undivided := sorted(w for w in widths if w % settings.group_size):
            fitting = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
            raise ConfigError(f"quantization.torchao.group_size={settings.group_size} does not divide {config.model.name}'s layer "
                              f"input width {', '.join(map(str, undivided))} (torchao would leave those layers unquantized); "
                              f"allowed here: {', '.join(map(str, fitting)) or 'none'}")
        if config.bits == 8 and settings.eight_bit == "float8_dynamic":
            import torch

            capability = torch.cuda.get_device_capability() if device == "cuda" else None
            if capability is None or capability < (8, 9):
                where = f"CUDA compute capability {capability[0]}.{capability[1]}" if capability else f"device={device}"
                raise ConfigError(f"quantization.torchao.eight_bit=float8_dynamic needs a GPU of CUDA compute capability >= 8.9 "
                                  f"({where}); choose int8 or float8 (weight-only) here")

    def load_config(self, config: JobConfig, device: str) -> Any:
        from transformers import TorchAoConfig

        return TorchAoConfig(_scheme(config, device)[0])

    def is_quantized(self, module: torch.nn.Module) -> bool:
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass

        return is_traceable_wrapper_subclass(getattr(module, "weight", None))

    def findings(self, module: torch.nn.Module, config: JobConfig, device: str) -> tuple[dict, dict]:
        """The weight's tensor subclass, the bytes of its data (int4: two weights a byte), the block
        a scale covers (int4: one row's group_size weights; 8-bit: one whole row, so that a
        per-tensor scale is refused), whether activations are quantized too."""
        weight = module.weight
        subclass = _scheme(config, device)[1]
        rows, columns = weight.shape
        data = getattr(weight, "qdata", None) if self.is_quantized(module) else None
        if subclass == "Int4TilePackedTo4dTensor":  # tinygemm's layout pads rows to 8 and columns to 1024 (the padding is read too)
            rows, columns = -(-rows // 8) * 8, -(-columns // 1024) * 1024
        settings = config.quantization.settings
        asked = {"weight": subclass, "data bytes": rows * columns // (2 if config.bits == 4 else 1),
                 "scale block": (1, settings.group_size if config.bits == 4 else columns),
                 "activations": "quantized" if config.bits == 8 and settings.eight_bit == "float8_dynamic" else "as they are"}
        found = {"weight": type(weight).__name__, "data bytes": None if data is None else data.numel() * data.element_size(),
                 "scale block": tuple(getattr(weight, "block_size", None) or ()) or None,
                 "activations": "quantized" if getattr(weight, "act_quant_kwargs", None) is not None else "as they are"}
        return asked, found

    def inductor_options(self, config: JobConfig) -> dict[str, Any]:
        """int8 and float8 weight-only layers are a conversion of the weight and a matmul. At batch 1
        inductor writes that matmul as one reduction that reads the 8-bit weight once, but only under
        coordinate-descent tuning (torch/_inductor/decomposition.py, `mm`); without it the step
        converts every weight to bf16 and then multiplies, over ten times slower on Falcon-7B. The
        compile takes about twice as long."""
        weight_only = config.bits == 8 and config.quantization.settings.eight_bit in ("int8", "float8")
        return {"coordinate_descent_tuning": True} if weight_only and config.batch_size == 1 else {}

    def hint(self, key: str, found: Any, config: JobConfig) -> str:
        if key == "weight" and found == "Parameter" and config.bits == 4:
            return (f"torchao leaves a layer unquantized when quantization.torchao.group_size={config.quantization.settings.group_size} "
                    "does not divide its input width")
        return ""


# torchao's layouts by scheme and device: (its config, the weight's tensor subclass). int4 has one
# kernel family per device: tinygemm's tile-packed layout on CUDA, the opaque CPU layout (a torchao
# prototype) on the CPU. set_inductor_config=False: torchao's recommended inductor settings turn on
# coordinate-descent autotuning, under which the fast path's compile of Falcon-7B ran past three
# minutes on an H200; every backend's fast path compiles with the same inductor defaults.
def _scheme(config: JobConfig, device: str) -> tuple[Any, str]:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    settings = config.quantization.settings
    if config.bits == 4 and device == "cuda":
        return (Int4WeightOnlyConfig(group_size=settings.group_size, int4_packing_format="tile_packed_to_4d", set_inductor_config=False),
                "Int4TilePackedTo4dTensor")
    if config.bits == 4:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=settings.group_size, set_inductor_config=False), "Int4OpaqueTensor"
    return {"int8": (Int8WeightOnlyConfig(set_inductor_config=False), "Int8Tensor"),
            "float8": (Float8WeightOnlyConfig(set_inductor_config=False), "Float8Tensor"),
            "float8_dynamic": (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False), "Float8Tensor"),
            }[settings.eight_bit]

"""Symmetric 4- and 8-bit weights in GPTQ's format, and the layer that multiplies by them: with
vLLM's Marlin kernel on a CUDA GPU, by dequantizing on the CPU.

GPTQ's format: per output row and group of `group_size` inputs (or the whole row), a scale
s = 2 * max|w| / (2^bits - 1) and codes q = clamp(round(w / s) + 2^(bits-1), 0, 2^bits - 1), so a
weight is (q - 2^(bits-1)) * s; the codes packed 32/bits to an int32 along the input dimension.
Marlin takes them after its own repacking (`gptq_marlin_repack`) and its scale permutation. Its
tiles need the output width a multiple of 64 and the input width of 128 (or 128 and 64): other
layers are zero-padded, and those padded weights are stored and read.

The kernel comes from a compiled library that registers the ops `gptqmodel_marlin_bf16::*`: the
one FALCON_EXP_MARLIN_LIBRARY names (experiments/gpu/build_marlin.py builds it from gptqmodel's
sources), else gptqmodel's own (>= 7.7, which builds it on first use) where installed.
"""

from __future__ import annotations

import importlib.metadata
import math
import os

import torch

NAMESPACE = "gptqmodel_marlin_bf16"
LIBRARY_ENV = "FALCON_EXP_MARLIN_LIBRARY"
MARLIN_LAYOUT, GPTQ_LAYOUT = "marlin", "gptq"  # where a layer's codes live: a CUDA GPU, or elsewhere
# vLLM's ScalarType ids (csrc/core/scalar_type.hpp) of the weight types: unsigned codes with an
# implicit bias of 2^(bits-1), i.e. GPTQ's symmetric codes.
WEIGHT_TYPE_IDS = {4: 1125899907892224, 8: 1125899923621888}  # uint4b8, uint8b128


def kernel_source() -> str | None:
    """Where the Marlin ops come from once loaded (the library's path, or gptqmodel's build); None
    when neither is there. Loads the library on first call (raising what its loader raises)."""
    global _source
    if _source is None:
        if path := os.environ.get(LIBRARY_ENV):
            torch.ops.load_library(path)
            _source = path
        else:
            try:
                from gptqmodel.utils.marlin import prewarm_marlin_extension
            except ImportError:
                return None
            prewarm_marlin_extension(torch.bfloat16)  # builds on first use; raises where it cannot
            _source = f"gptqmodel {importlib.metadata.version('gptqmodel')}'s build"
    return _source


_source: str | None = None


def padded_shape(rows: int, columns: int, group_size: int) -> tuple[int, int]:
    """The smallest (rows, columns) at least these that one of Marlin's tile orientations takes,
    with whole groups along a row (gptqmodel's marlin_padded_nk)."""
    group = group_size if group_size > 0 else 1
    candidates = ((_round_up(rows, 64), _round_up(columns, math.lcm(128, group))),
                  (_round_up(rows, 128), _round_up(columns, math.lcm(64, group))))
    return min(candidates, key=lambda shape: (shape[0] * shape[1], shape))


def quantize(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's symmetric codes (rows x columns, int16) and bf16 scales (groups x rows) of a weight,
    by rounding to nearest; `group_size` -1 is one scale per row. A row or group of zeros gets
    scale 1, so its codes are the bias and its weights stay 0."""
    rows, columns = weight.shape
    group = columns if group_size == -1 else group_size
    grouped = weight.float().reshape(rows, columns // group, group)
    peak = grouped.abs().amax(-1)
    scales = torch.where(peak > 0, 2 * peak / (2**bits - 1), 1.0).to(torch.bfloat16)
    codes = (grouped / scales.float()[..., None]).round() + 2 ** (bits - 1)
    return codes.clamp(0, 2**bits - 1).to(torch.int16).reshape(rows, columns), scales.t().contiguous()


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's `qweight`: codes (rows x columns) packed 32/bits to an int32 along the columns,
    the first in the lowest bits, stored (columns / (32/bits)) x rows."""
    per_word = 32 // bits
    columns = codes.t().to(torch.int64).reshape(-1, per_word, codes.shape[0])
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64)[None, :, None] * bits
    words = (columns << shifts).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes `pack` packed, as GPTQ stores them: columns x rows (int32)."""
    shifts = torch.arange(32 // bits, device=qweight.device, dtype=torch.int32)[None, :, None] * bits
    return ((qweight[:, None, :] >> shifts) & (2**bits - 1)).reshape(-1, qweight.shape[1])


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights GPTQ's qweight and scales stand for, columns x rows (the transpose of the
    layer's weight), computed in `dtype` (exact up to its one rounding of code times scale)."""
    codes = unpack(qweight, bits).to(dtype) - 2 ** (bits - 1)
    return (codes.reshape(scales.shape[0], -1, codes.shape[1]) * scales.to(dtype)[:, None, :]).reshape(codes.shape)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _scale_order(columns: int, rows: int, group_size: int, device: torch.device) -> torch.Tensor:
    """Marlin's permutation of a scale matrix's columns within each block (gptqmodel's
    marlin_permute_scales): 64 for grouped scales, 32 for one per row."""
    if 0 < group_size < columns:
        order = [i + 8 * j for i in range(8) for j in range(8)]
    else:
        order = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    return torch.tensor(order, device=device)


def to_marlin(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's qweight and scales (on a CUDA GPU) in Marlin's layouts (the same sizes)."""
    ops = getattr(torch.ops, NAMESPACE)
    columns, rows = qweight.shape[0] * 32 // bits, qweight.shape[1]
    no_order = torch.empty(0, dtype=torch.int32, device=qweight.device)
    marlin_weight = ops.gptq_marlin_repack(qweight.contiguous(), no_order, columns, rows, bits)
    order = _scale_order(columns, rows, group_size, scales.device)
    marlin_scales = scales.reshape(-1, order.numel()).index_select(1, order).reshape(-1, rows).contiguous()
    return marlin_weight, marlin_scales


def workspace(device: torch.device) -> torch.Tensor:
    """Marlin's lock workspace (one int per thread block it may run; the kernel leaves it zeroed)."""
    blocks = max(torch.cuda.get_device_properties(device).multi_processor_count, 128)
    return torch.zeros(blocks, dtype=torch.int32, device=device)


@torch.library.custom_op("falcon_exp::marlin_mm", mutates_args=())
def marlin_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, locks: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """x (m x columns, bf16) times the Marlin-packed weight's transpose: m x rows. A functional op
    of its own, so that torch.compile treats the kernel as one opaque call (the library's op
    declares an optional output it may write into). `locks` is written during the call but left
    zeroed as it came (the kernel's contract), so it is not declared mutated: that would make
    torch.compile copy it around every call."""
    ops = getattr(torch.ops, NAMESPACE)
    return ops.gptq_marlin_gemm_bf16(x, None, weight, None, scales, None, None, None, None, locks, WEIGHT_TYPE_IDS[bits],
                                     x.shape[0], rows, x.shape[1], True, False, True, False)


@marlin_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, locks: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], rows))


def layout_on(device: str) -> str:
    """The layout a layer's codes take on this device type: Marlin's on a CUDA GPU, GPTQ's elsewhere."""
    return MARLIN_LAYOUT if device == "cuda" else GPTQ_LAYOUT


def layout_bytes(rows: int, columns: int, bits: int, group_size: int) -> int:
    """Bytes of a (padded) layer's codes and bf16 scales, in either layout."""
    groups = 1 if group_size == -1 else columns // group_size
    return rows * columns * bits // 8 + groups * rows * 2


class MarlinLinear(torch.nn.Module):
    """A linear layer of GPTQ-format codes, zero-padded to Marlin's tiles: on a CUDA GPU in
    Marlin's layouts, multiplied by its kernel; elsewhere in GPTQ's, dequantized and multiplied."""

    def __init__(self, linear: torch.nn.Linear, bits: int, group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.bits, self.group_size = bits, group_size
        self.padded_rows, self.padded_columns = padded_shape(self.out_features, self.in_features, group_size)
        device = linear.weight.device
        weight = torch.nn.functional.pad(linear.weight.detach(), (0, self.padded_columns - self.in_features,
                                                                  0, self.padded_rows - self.out_features))
        codes, scales = quantize(weight, bits, group_size)
        qweight = pack(codes, bits)
        self.layout = layout_on(device.type)
        if self.layout == MARLIN_LAYOUT:
            qweight, scales = to_marlin(qweight, scales, bits, group_size)
            self.locks = _workspace(device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.padded_columns > self.in_features:
            flat = torch.nn.functional.pad(flat, (0, self.padded_columns - self.in_features))
        if self.layout == MARLIN_LAYOUT:
            out = marlin_mm(flat.contiguous(), self.qweight, self.scales, self.locks, self.bits, self.padded_rows)
        else:
            out = flat @ dequantize(self.qweight, self.scales, self.bits, x.dtype)
        if self.padded_rows > self.out_features:
            out = out[:, : self.out_features].contiguous()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, layout={self.layout}")


_workspaces: dict[torch.device, torch.Tensor] = {}


def _workspace(device: torch.device) -> torch.Tensor:
    """One lock workspace per GPU, shared by its layers (they run one after another on a stream)."""
    if device not in _workspaces:
        _workspaces[device] = workspace(device)
    return _workspaces[device]

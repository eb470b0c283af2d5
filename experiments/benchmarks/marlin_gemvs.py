"""vLLM's Marlin kernel (falcon_exp/backends/marlin_kernel.py) on Falcon's decode matrices against
cuBLAS's bf16: x @ W.t() for [query_key_value, dense, dense_h_to_4h, dense_4h_to_h] x layers,
random weights rounded to GPTQ's symmetric 4- and 8-bit codes, each set captured in one CUDA graph,
the median of 50 replays (falcon_exp.measure's timer); then each matrix kind alone. GB/s counts
what each reads: the codes and scales (padded where Marlin's tiles need it), or the bf16 weights.
Also checks each mode's output against its dequantized weights. Needs a CUDA GPU and the Marlin
library (FALCON_EXP_MARLIN_LIBRARY, or gptqmodel).

    python experiments/benchmarks/marlin_gemvs.py [--models falcon-7b falcon-40b] [--batches 1 16]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from falcon_exp.backends import marlin_kernel as marlin
from falcon_exp.decode import cuda_graph_of
from falcon_exp.measure import median_seconds

# layers timed (enough that the weights are far beyond the 50 MB L2), hidden, query_key_value, MLP widths
MODELS = {"falcon-7b": (32, 4544, 4672, 18176), "falcon-40b": (16, 8192, 9216, 32768)}
KINDS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
MODES = {"bf16 (cuBLAS)": None, "marlin 4-bit, group 128": (4, 128), "marlin 4-bit, group 64": (4, 64),
         "marlin 8-bit, per row": (8, -1), "marlin 8-bit, group 128": (8, 128)}


def graph_ms(step: Callable[[], object], replays: int = 50) -> float:
    return median_seconds("cuda", 0, cuda_graph_of(step).replay, replays) * 1e3


def shapes(hidden: int, qkv: int, ffn: int) -> list[tuple[int, int]]:
    return [(qkv, hidden), (hidden, hidden), (ffn, hidden), (hidden, ffn)]


class Layer:
    """One matrix as a mode stores it, and its call on an input already padded to its width."""

    def __init__(self, rows: int, columns: int, how: tuple[int, int] | None, locks: torch.Tensor) -> None:
        weight = torch.randn(rows, columns, device="cuda", dtype=torch.bfloat16) * 0.02
        if how is None:
            self.columns, self.bytes, self.weight = columns, weight.numel() * 2, weight
            self.call = lambda x: x @ self.weight.t()
            self.reference = weight.float()
            return
        bits, group = how
        padded_rows, self.columns = marlin.padded_shape(rows, columns, group)
        weight = torch.nn.functional.pad(weight, (0, self.columns - columns, 0, padded_rows - rows))
        codes, scales = marlin.quantize(weight, bits, group)
        qweight = marlin.pack(codes, bits)
        self.reference = marlin.dequantize(qweight, scales, bits).t()
        packed, scales = marlin.to_marlin(qweight, scales, bits, group)
        self.bytes = packed.numel() * 4 + scales.numel() * 2
        self.call = lambda x: marlin.marlin_mm(x, packed, scales, locks, bits, padded_rows)


def compare(model: str, batches: list[int]) -> None:
    layers, *widths = MODELS[model]
    locks = marlin.workspace(torch.device("cuda"))
    for mode, how in MODES.items():
        torch.manual_seed(0)
        time_sets(f"{model} {mode}", [[Layer(*shape, how, locks) for shape in shapes(*widths)] for _ in range(layers)], batches)
        torch.cuda.empty_cache()


def time_sets(name: str, sets: list[list[Layer]], batches: list[int]) -> None:
    gb = sum(m.bytes for layer in sets for m in layer) / 1e9
    probe = sets[0][0]
    x = torch.randn(1, probe.columns, device="cuda", dtype=torch.bfloat16)
    expected = x.float() @ probe.reference.t()
    error = ((probe.call(x).float() - expected).abs().max() / expected.abs().max()).item()
    for batch in batches:
        inputs = [torch.randn(batch, m.columns, device="cuda", dtype=torch.bfloat16) for m in sets[0]]
        ms = graph_ms(lambda: [m.call(x) for layer in sets for m, x in zip(layer, inputs)])  # noqa: B023 - called at once
        alone = []
        for i, kind in enumerate(KINDS):
            kind_ms = graph_ms(lambda i=i: [layer[i].call(inputs[i]) for layer in sets])  # noqa: B023
            alone.append(f"{kind} {sum(layer[i].bytes for layer in sets) / kind_ms / 1e6:.0f}")
        print(f"{name:36s} batch {batch:2d} {ms:7.3f} ms for {gb:6.3f} GB: {gb / ms * 1e3:5.0f} GB/s "
              f"(alone, GB/s: {', '.join(alone)}); max error vs its dequantized weights {error:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Marlin from {marlin.kernel_source()}")
    for model in args.models:
        compare(model, args.batches)


if __name__ == "__main__":
    main()

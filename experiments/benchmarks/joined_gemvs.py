"""Falcon-7B's four weight reads per layer against the two of the lean step (falcon_exp/falcon_step.py):
x @ W.t() for [query_key_value, dense, dense_h_to_4h, dense_4h_to_h] x 32 layers, against
[query_key_value; dense_h_to_4h] and [dense | dense_4h_to_h], random bf16 weights, each set captured
in one CUDA graph, the median of 50 replays (falcon_exp.measure's timer); then each matrix alone x 32. Needs a CUDA GPU.

    python experiments/benchmarks/joined_gemvs.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from falcon_exp.decode import cuda_graph_of
from falcon_exp.measure import median_seconds

LAYERS, HIDDEN, QKV, FFN = 32, 4544, 4672, 18176  # Falcon-7B


def graph_ms(step: Callable[[], object], replays: int = 50) -> float:
    """The median ms of one replay of `step` captured as a CUDA graph, timed as the harness times."""
    return median_seconds("cuda", 0, cuda_graph_of(step).replay, replays) * 1e3


def weight(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02


def compare(batch: int) -> None:
    x, attended, activated = weight(batch, HIDDEN), weight(batch, HIDDEN), weight(batch, FFN)
    apart = [(weight(QKV, HIDDEN), weight(HIDDEN, HIDDEN), weight(FFN, HIDDEN), weight(HIDDEN, FFN)) for _ in range(LAYERS)]
    joined = [(torch.cat([qkv, up]), torch.cat([dense, down], dim=1)) for qkv, dense, up, down in apart]
    both = torch.cat([attended, activated], dim=1)
    gb = sum(w.numel() * 2 for layer in apart for w in layer) / 1e9

    def four() -> None:
        for qkv, dense, up, down in apart:
            x @ qkv.t(), attended @ dense.t(), x @ up.t(), activated @ down.t()

    def two() -> None:
        for into, out_of in joined:
            x @ into.t(), both @ out_of.t()

    for name, step in (("four per layer", four), ("two per layer", two)):
        ms = graph_ms(step)
        print(f"batch {batch} {name:15s} {ms:.3f} ms for {gb:.3f} GB: {gb / ms * 1e3:.0f} GB/s")
    for i, (name, inputs) in enumerate((("qkv", x), ("dense", attended), ("h_to_4h", x), ("4h_to_h", activated))):
        weights = [layer[i] for layer in apart]
        ms = graph_ms(lambda inputs=inputs, weights=weights: [inputs @ w.t() for w in weights])
        print(f"  batch {batch} {name:8s} x{LAYERS}: {ms:.3f} ms, {LAYERS * weights[0].numel() * 2 / ms / 1e6:.0f} GB/s")


def main() -> None:
    torch.manual_seed(0)
    for batch in (1, 4):
        compare(batch)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""Which read gives the floor's denominator: each way falcon_exp/roofline.py measures (a large
reduction, a batch-1 GEMV in bf16 and fp32), measured as a job measures them, beside cuBLAS' bf16
GEMV on Falcon's decode matrices, 20 calls captured in one CUDA graph (the way the fastest weight
read streams in a decode step), and that GEMV's earlier form here (one call on a 1 GiB weight
8192 wide, no graph). Writes one CSV row per reading.

    python experiments/benchmarks/read_bandwidth.py --out read-bandwidth.csv
"""

from __future__ import annotations

import argparse
import csv
import platform
from pathlib import Path

import torch

from falcon_exp import roofline
from falcon_exp.environment import commit
from falcon_exp.measure import median_seconds

# (rows, columns) of a weight: out_features x in_features
MATRICES = {
    "falcon-7b mlp up": (18176, 4544),
    "falcon-7b mlp down": (4544, 18176),
    "falcon-40b mlp up": (32768, 8192),
    "falcon-40b mlp down": (8192, 32768),
}
CALLS = 20


def graphed_gemv(rows: int, columns: int) -> float:
    """Bytes/s read by CALLS bf16 products of one token with a (rows x columns) weight, replayed as one CUDA graph."""
    weight = torch.randn(rows, columns, dtype=torch.bfloat16, device="cuda")
    token = torch.randn(1, columns, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        torch.nn.functional.linear(token, weight)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            torch.nn.functional.linear(token, weight)
    return CALLS * weight.numel() * 2 / median_seconds("cuda", 0, graph.replay, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()
    measured = roofline.measure(device, 0)
    rows = [("harness", method, "", value) for method, value in measured["readings"].items()]
    rows.append(("harness", "copy (read + written)", "", measured["copy"]))
    if device == "cuda":
        rows += [("cuBLAS GEMV, one CUDA graph", matrix, r * c * 2, graphed_gemv(r, c)) for matrix, (r, c) in MATRICES.items()]
        weight = torch.ones(2**30 // (8192 * 2), 8192, dtype=torch.bfloat16, device="cuda")
        token = torch.ones(1, 8192, dtype=torch.bfloat16, device="cuda")
        seconds = median_seconds("cuda", 0, lambda: torch.nn.functional.linear(token, weight), 20)
        rows.append(("cuBLAS GEMV, one call", "65536 x 8192", 2**30, 2**30 / seconds))
    with args.out.open("w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(["device", "torch", "commit", "source", "method", "bytes", "gbs"])
        for source, method, size, value in rows:
            writer.writerow([name, torch.__version__, (commit() or "unknown")[:7], source, method, size, f"{value / 1e9:.1f}"])
    print(args.out.read_text())


if __name__ == "__main__":
    main()

"""Which layers of a synthetic model send columns past LLM.int8's outlier threshold, and why.

Builds the shipped architecture with the harness's synthetic weights (a few layers: every layer
shares the same random values), runs one prompt-sized forward in bf16 on the CPU, and prints
per linear layer the largest input magnitude and how many input columns exceed the threshold
(what bitsandbytes would split off to its fp16 path).

    python experiments/benchmarks/outlier_columns.py falcon-40b [--layers 2] [--outliers 0] [--tokens 12]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

from falcon_exp.weights import ARCHITECTURES_DIR, architecture_config, synthetic_state_dict


def columns_past(architecture: str, layers: int, outliers: int, tokens: int, threshold: float) -> dict[str, tuple[float, int, int]]:
    """Per linear layer: the largest input magnitude, the input columns past the threshold, the width."""
    config = architecture_config(architecture)
    config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    planted = (outliers, 20.0) if outliers else None
    model.load_state_dict(synthetic_state_dict(config, 0, torch.bfloat16, distinct=False, outliers=planted), strict=False)
    seen = {}

    def record(name):
        def hook(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float().abs()
            seen[name] = (float(x.max()), int((x > threshold).any(0).sum()), x.shape[-1])
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(record(name))
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)))
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("architecture", help="a shipped architecture: " + ", ".join(p.stem for p in ARCHITECTURES_DIR.glob("*.json")))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--outliers", type=int, default=0, help="planted outlier dims (model.synthetic_outliers)")
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--threshold", type=float, default=6.0)
    args = parser.parse_args()
    seen = columns_past(args.architecture, args.layers, args.outliers, args.tokens, args.threshold)
    print(f"{args.architecture}, {args.layers} layers, {args.tokens} tokens, planted outliers {args.outliers}, threshold {args.threshold}")
    for name, (largest, columns, width) in seen.items():
        print(f"  {name:<45} max |input| {largest:6.2f}   columns past the threshold {columns:5d} of {width}")


if __name__ == "__main__":
    main()

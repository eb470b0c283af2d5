"""One new token's attention over a static cache in Falcon-7B's shape as the lean step takes it
(71 query rows against one key-value head, half the cache masked), each way called 32 times on
the same cache in one CUDA graph (a step's layers, one cache for all), in us per call: torch's
fused kernels (cuDNN, memory-efficient), its math attention, the same written out (queries times
keys in bf16, as transformers' eager Falcon does) and compiled by inductor, and transformers'
layout (71 heads broadcast against one, which only the math attention takes). The error is
against float32. Needs a CUDA GPU.

    python experiments/benchmarks/one_token_attention.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from joined_gemvs import graph_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, HEAD_DIM, LAYERS = 71, 64, 32


def written_out(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    scores = (query @ key.transpose(-1, -2)).float() * HEAD_DIM**-0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1).to(query.dtype) @ value


def us_per_call(attend, *args, **kwargs) -> float:
    return graph_ms(lambda: [attend(*args, **kwargs) for _ in range(LAYERS)], replays=100) * 1e3 / LAYERS


def main() -> None:
    compiled = torch.compile(written_out, dynamic=False)
    for length in (80, 2048):
        query = torch.randn(1, 1, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        key, value = (torch.randn(1, 1, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        mask = torch.arange(length, device="cuda")[None, None, None, :] < length // 2
        exact = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask)
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("math", SDPBackend.MATH)):
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
                us = us_per_call(F.scaled_dot_product_attention, query, key, value, attn_mask=mask)
            print(f"L={length} sdpa {name:10s} {us:6.2f} us/layer  max err {(out.float() - exact).abs().max():.2e}")
        out = compiled(query, key, value, mask)
        us = us_per_call(compiled, query, key, value, mask)
        print(f"L={length} compiled written-out {us:6.2f} us/layer  max err {(out.float() - exact).abs().max():.2e}")
        heads = query.transpose(1, 2)
        with sdpa_kernel(SDPBackend.MATH):
            us = us_per_call(F.scaled_dot_product_attention, heads, key, value, attn_mask=mask)
        print(f"L={length} broadcast math    {us:6.2f} us/layer")


if __name__ == "__main__":
    main()

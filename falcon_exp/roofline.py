"""How close decoding comes to the memory-bandwidth limit.

At batch 1 a decode step must read every weight it uses once, and the KV cache so far, so
(bytes per step / copy bandwidth) is a floor on the time per token; `roofline_fraction` is that
floor over the measured time (1.0 would be a step that only streams memory). Copy bandwidth is
what a large device-to-device copy achieves, counting bytes read plus bytes written, measured
once per machine and cached.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import torch

from falcon_exp.models import cache_dir, say
from falcon_exp.quantization import weights_bytes

COPY_BYTES = {"cuda": 2**30, "cpu": 2**28}  # per buffer; far beyond any cache
COPY_ROUNDS = {"cuda": 20, "cpu": 5}


def _device_names(device: str) -> list[str]:
    if device == "cuda":
        return [f"cuda{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return [f"cpu {platform.processor() or platform.machine()} threads={torch.get_num_threads()}"]


def _measure_copy(device: str, index: int) -> float:
    """Bytes read plus written per second by one large copy (median of several)."""
    count = COPY_BYTES[device]
    target = torch.device("cuda", index) if device == "cuda" else torch.device("cpu")
    source = torch.ones(count, dtype=torch.uint8, device=target)
    destination = torch.empty_like(source)
    seconds = []
    for round_ in range(COPY_ROUNDS[device] + 2):  # the first two warm up
        if device == "cuda":
            with torch.cuda.device(index):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                destination.copy_(source)
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            destination.copy_(source)
            elapsed = time.perf_counter() - begin
        if round_ >= 2:
            seconds.append(elapsed)
    return 2 * count / statistics.median(seconds)


def copy_bandwidth(device: str) -> float:
    """The slowest visible device's copy bandwidth in bytes/s (GPUs of one host are alike)."""
    path = cache_dir() / "bandwidth.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    names = [f"{platform.node()} {name}" for name in _device_names(device)]
    missing = [(i, n) for i, n in enumerate(names) if n not in known]
    for index, name in missing:
        known[name] = _measure_copy(device, index)
        say(f"copy bandwidth of {name}: {known[name] / 1e9:.0f} GB/s (read + written; cached in {path})")
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=1, sort_keys=True))
    return min(known[n] for n in names)


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: all (with quantization scales), except that the input
    embedding table gives one row unless it is also the output head."""
    total = weights_bytes(model)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() == embedding.data_ptr():
        return total
    row = embedding.shape[1] * embedding.element_size()
    return total - embedding.numel() * embedding.element_size() + row


def kv_bytes_per_token(model: torch.nn.Module, token: torch.Tensor) -> int:
    """Bytes the model's own cache stores per token of context (read again by every later step),
    found by running one token: layouts differ (Falcon-40B stores keys expanded to every head)."""
    with torch.no_grad():
        output = model(token[:, :1], use_cache=True)
    cache = output.cache if hasattr(output, "cache") else output.past_key_values  # renamed in transformers 5
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def step_bytes(weights_step: int, kv_per_token: int, prompt_tokens: int, new_tokens: int) -> float:
    """Mean bytes per decode step: decode step i (1..n-1) attends to prompt + i tokens."""
    return weights_step + kv_per_token * (prompt_tokens + new_tokens / 2)


def fraction(bytes_per_step: float, bandwidth: float, ms_per_token: float) -> float:
    return (bytes_per_step / bandwidth) * 1e3 / ms_per_token

"""How close decoding comes to the memory-bandwidth limit.

At batch 1 a decode step must read every weight it uses once, and the KV cache as the decoder
reads it, and writes next to nothing; so (bytes per step / read bandwidth) is a floor on the time
per token, and `roofline_fraction` is that floor over the measured time (1.0 would be a step that
only streams memory). The read bandwidth is the fastest of several reads of a large buffer: a
reduction, and a batch-1 matrix-vector product (`x @ W.t()`, as a decode step reads its weights,
on a GPU replayed in a CUDA graph) in bf16 and in fp32: a floor from a read that a decode step's
own kernels beat would be too high. A large copy is measured too (bytes read plus written per second,
for comparison with published copy figures). Both are measured once per machine and cached with
the methods that made them: a cache made by other methods is measured anew, never reused.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable

import torch

from falcon_exp.cache import cache_dir, locked, replaced
from falcon_exp.console import log
from falcon_exp.measure import median_seconds
from falcon_exp.quantization import weights_bytes
from falcon_exp.records import Bandwidth

BUFFER_BYTES = {"cuda": 2**30, "cpu": 2**28}  # far beyond any cache
ROUNDS = {"cuda": 20, "cpu": 5}
BANDWIDTH_FILE = "bandwidth.json"


def _device_names(device: str) -> list[str]:
    if device == "cuda":
        return [f"cuda{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return [f"cpu {platform.processor() or platform.machine()} threads={torch.get_num_threads()}"]


# Each way of reading, made ready on a device: the call that reads, and the bytes one call reads.
READS: dict[str, Callable[[torch.device], tuple[Callable[[], object], int]]] = {
    "reduction": lambda at: _reduction(at),
    "gemv_bf16": lambda at: _gemv(torch.bfloat16, at),
    "gemv_fp32": lambda at: _gemv(torch.float32, at),
}
WEIGHT_SHAPE = (32768, 8192)  # Falcon-40B's MLP up-projection: the decode matrix cuBLAS read fastest on an H200
GRAPHED_CALLS = 20
# What a cached bandwidth was measured by: one measured otherwise (other ways, sizes, torch) is not reused.
METHODS = f"{','.join(READS)} weight={WEIGHT_SHAPE} graphed={GRAPHED_CALLS} buffers={BUFFER_BYTES} torch={torch.__version__}"


def _reduction(at: torch.device) -> tuple[Callable[[], object], int]:
    buffer = torch.ones(BUFFER_BYTES[at.type] // 4, device=at)
    return buffer.sum, buffer.numel() * 4


def _gemv(dtype: torch.dtype, at: torch.device) -> tuple[Callable[[], object], int]:
    """One token's product with a weight as a decode step makes it: on a GPU, Falcon-40B's MLP
    up-projection GRAPHED_CALLS times in one CUDA graph (launch gaps out, as in the decode step's
    graph); on the CPU, a weight of BUFFER_BYTES, 8192 inputs wide."""
    columns = WEIGHT_SHAPE[1]
    rows = WEIGHT_SHAPE[0] if at.type == "cuda" else BUFFER_BYTES["cpu"] // (columns * dtype.itemsize)
    weight = torch.ones(rows, columns, dtype=dtype, device=at)
    token = torch.ones(1, columns, dtype=dtype, device=at)
    if at.type != "cuda":
        return lambda: torch.nn.functional.linear(token, weight), weight.numel() * dtype.itemsize
    with torch.cuda.device(at):
        torch.nn.functional.linear(token, weight)  # cuBLAS' workspace and kernel choice, before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPHED_CALLS):
                torch.nn.functional.linear(token, weight)
    held = (graph, weight, token)  # a graph does not keep the tensors it reads alive
    return lambda: held[0].replay(), GRAPHED_CALLS * weight.numel() * dtype.itemsize


def measure(device: str, index: int) -> dict:
    """Bytes/s read by each way in READS (the fastest is the read bandwidth, its method named),
    and read plus written by a large copy."""
    count = BUFFER_BYTES[device]
    target = torch.device("cuda", index) if device == "cuda" else torch.device("cpu")
    readings = {}
    for method, ready in READS.items():
        read, size = ready(target)
        readings[method] = size / median_seconds(device, index, read, ROUNDS[device])
        del read  # its buffers, before the next way's
    source = torch.ones(count // 4, dtype=torch.float32, device=target)
    destination = torch.empty_like(source)
    copy = 2 * count / median_seconds(device, index, lambda: destination.copy_(source), ROUNDS[device])
    method = max(readings, key=readings.get)
    return {"read": readings[method], "read_method": method, "readings": readings, "methods": METHODS, "copy": copy}


def bandwidth(device: str) -> Bandwidth:
    """The slowest visible device's read and copy bandwidth in bytes/s, measured once per machine
    (GPUs of one host are alike). Parallel jobs measure one at a time (they would slow each
    other's measurement) under a lock, and the cache file is replaced whole, never half-written."""
    path = cache_dir() / BANDWIDTH_FILE
    names = [f"{platform.node()} {name}" for name in _device_names(device)]
    with locked(BANDWIDTH_FILE):
        known = json.loads(path.read_text()) if path.is_file() else {}
        missing = [(i, n) for i, n in enumerate(names) if not isinstance(known.get(n), dict) or known[n].get("methods") != METHODS]
        for index, name in missing:
            known[name] = measure(device, index)
            log.info(f"bandwidth of {name}: read {known[name]['read'] / 1e9:.0f} GB/s ({known[name]['read_method']}), "
                     f"copy {known[name]['copy'] / 1e9:.0f} GB/s (read + written); cached in {path}")
        if missing:
            with replaced(path) as staging:
                staging.write_text(json.dumps(known, indent=1, sort_keys=True))
    slowest = min(names, key=lambda n: known[n]["read"])
    return Bandwidth(read=known[slowest]["read"], copy=min(known[n]["copy"] for n in names), read_method=known[slowest]["read_method"],
                     readings=dict(sorted(known[slowest]["readings"].items())))  # as the cache file holds them


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


def floor_ms(bytes_per_step: float, read_bandwidth: float) -> float:
    """The fastest a decode step that must read these bytes can be, in ms."""
    return bytes_per_step / read_bandwidth * 1e3


def fraction(floor_ms_per_token: float, ms_per_token: float) -> float:
    return floor_ms_per_token / ms_per_token

"""Timers and memory probes around one `generate` call. Returns plain data; knows nothing of MLflow.

Timing: the clock starts after tokenisation, with the device synchronised; a streamer stamps each
new token inside generate (generate hands it the token already copied to the host, so the stamp
follows the device's work); the clock stops after a final synchronisation.
Memory: the allocator's peaks per CUDA device (allocated and reserved), the driver's view of each
device, and the process's peak resident memory on the host, all reset before the timed work.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from transformers.generation.streamers import BaseStreamer

GB = 1e9


class TokenClock(BaseStreamer):
    """Stamps the moment each generated token reaches the host."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt itself
            self._prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass(frozen=True)
class Timing:
    prompt_tokens: int
    new_tokens: int
    generate_s: float
    ttft_ms: float
    decode_ms_per_token: float
    tokens_per_s: float


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, input_ids: torch.Tensor, new_tokens: int, force_length: bool, device: str, pad_token_id: int):
    """One greedy generation, timed. Returns (Timing, generated token ids)."""
    clock = TokenClock()
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens if force_length else None,
            do_sample=False,
            streamer=clock,
            pad_token_id=pad_token_id,
        )
    synchronize(device)
    generate_s = time.perf_counter() - start
    generated = output[0, input_ids.shape[1] :].tolist()
    stamps = clock.stamps
    ttft_s = stamps[0] - start
    decode = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    timing = Timing(
        prompt_tokens=int(input_ids.shape[1]),
        new_tokens=len(generated),
        generate_s=generate_s,
        ttft_ms=ttft_s * 1e3,
        decode_ms_per_token=decode * 1e3,
        tokens_per_s=len(generated) / generate_s,
    )
    return timing, generated


def summarize(values: list[float]) -> dict[str, float]:
    """Median and spread of repeated measurements (nan-free values only)."""
    clean = sorted(v for v in values if v == v)
    if not clean:
        return {}
    quartiles = statistics.quantiles(clean, n=4, method="inclusive") if len(clean) > 1 else [clean[0]] * 3
    return {
        "median": statistics.median(clean),
        "mean": statistics.fmean(clean),
        "std": statistics.stdev(clean) if len(clean) > 1 else 0.0,
        "p25": quartiles[0],
        "p75": quartiles[2],
        "min": clean[0],
        "max": clean[-1],
    }


class MemoryProbe:
    """Peak memory since the last reset: allocator per CUDA device, driver per device, host RSS."""

    def __init__(self, device: str) -> None:
        self.devices = list(range(torch.cuda.device_count())) if device == "cuda" else []

    def reset(self) -> None:
        for index in self.devices:
            torch.cuda.reset_peak_memory_stats(index)
        _reset_peak_rss()

    def read(self) -> dict[str, float]:
        """Flat GB figures: totals across devices, and each device's own."""
        memory: dict[str, float] = {"peak_rss_gb": _peak_rss_bytes() / GB}
        allocated = reserved = driver = 0
        for index in self.devices:
            a, r = torch.cuda.max_memory_allocated(index), torch.cuda.max_memory_reserved(index)
            free, total = torch.cuda.mem_get_info(index)
            memory[f"cuda{index}/peak_allocated_gb"] = a / GB
            memory[f"cuda{index}/peak_reserved_gb"] = r / GB
            memory[f"cuda{index}/driver_used_gb"] = (total - free) / GB
            allocated, reserved, driver = allocated + a, reserved + r, driver + total - free
        if self.devices:
            memory |= {"peak_allocated_gb": allocated / GB, "peak_reserved_gb": reserved / GB, "driver_used_gb": driver / GB}
        return memory


_STATUS = Path("/proc/self/status")


def _reset_peak_rss() -> None:
    """Linux resets the resident high-water mark (VmHWM) on writing 5 to clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return psutil.Process(os.getpid()).memory_info().rss

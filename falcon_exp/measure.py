"""Timers and memory probes around one generation. Returns plain data; knows nothing of MLflow.

Timing: a clock marks the start (device synchronised first), each new token the moment the
decoder has it (falcon_exp.decode calls back from inside generation), and the end. On a GPU the
marks are CUDA events on the device's timeline; on the CPU, perf_counter readings.
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

GB = 1e9


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, perf_counter readings on the CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Each mark's time since the first (waits for the device to pass the last mark)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [self.marks[0].elapsed_time(m) / 1e3 for m in self.marks]
        return [m - self.marks[0] for m in self.marks]


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


def timed_generate(decoder, input_ids: torch.Tensor, new_tokens: int, force_length: bool, device: str):
    """One greedy generation by a falcon_exp.decode decoder, timed. Returns (Timing, token ids)."""
    clock = Clock(device)
    synchronize(device)
    clock.mark()
    generated = decoder.generate(input_ids, new_tokens, force_length, on_token=clock.mark)
    clock.mark()
    start, *stamps, end = clock.seconds()
    decode = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    timing = Timing(
        prompt_tokens=int(input_ids.shape[1]),
        new_tokens=len(generated),
        generate_s=end,
        ttft_ms=stamps[0] * 1e3,
        decode_ms_per_token=decode * 1e3,
        tokens_per_s=len(generated) / end,
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

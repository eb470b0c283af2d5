"""What crosses from a job to tracking: plain data, no torch, so that tracking (and the analysis
beside it) import without the inference stack."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    prompt_tokens: int
    new_tokens: int
    generate_s: float
    ttft_ms: float
    decode_ms_per_token: float
    e2e_tokens_per_s: float  # new tokens over the whole call, prefill included


@dataclass(frozen=True)
class Sample:
    prompt_index: int
    repetition: int
    prompt: str
    output: str
    timing: Timing
    memory: dict[str, float]  # peaks during this generation alone, by metric name
    floor_ms_per_token: float  # bytes this generation's decode steps read / read bandwidth
    roofline_fraction: float  # that floor over the measured decode time


@dataclass(frozen=True)
class QuantizationReport:
    """What the loaded model really is."""

    linear_layers: int
    quantized_layers: int
    weights_bytes: int
    realised: str  # "4bit", "8bit" or "none"


@dataclass(frozen=True)
class JobResult:
    samples: list[Sample]
    memory: dict[str, float]  # peaks over all timed generations, by metric name
    unmeasured: dict[str, str]  # metric -> why this run has no value for it
    report: QuantizationReport
    load_s: float | None  # None when the model was reused from an earlier job
    device: str
    quality: dict[str, float]  # empty when quality is off or cannot be measured
    decode_path: str  # eager, compiled_cuda_graph, cuda_graph or static_cache (falcon_exp/decode.py)
    fast_fallback: str | None  # why the fast path runs without compilation or without CUDA graphs
    bandwidth: dict[str, float]  # bytes/s: "read" (the floor's) and "copy"
    weight_bytes_per_step: int
    kv_bytes_per_token: float
    warmup_tokens: int  # generated untimed before the first timed generation
    cpu_kernel: str | None  # bitsandbytes' CPU kernel for this mode, on a CPU run
    int8_outliers: dict[str, float]  # LLM.int8's outlier path in the last decode step, by metric name; empty if none ran


@dataclass(frozen=True)
class SweepNeeds:
    """What the jobs of a sweep will ask of the quality reference: its text as long as the
    longest continuation, and free to stop at end-of-sequence if any job may."""

    longest_new_tokens: int = 0
    stops_early: bool = False


def median(values: list[float]) -> float | None:
    """The median of the nan-free values; None when there are none."""
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else None


def repetition_std(values_by_prompt: dict[int, list[float]]) -> float | None:
    """The spread between repetitions: each prompt's standard deviation over its repetitions,
    then the median over prompts. None with fewer than two repetitions of any prompt."""
    spreads = []
    for values in values_by_prompt.values():
        clean = [v for v in values if v == v]
        if len(clean) > 1:
            spreads.append(statistics.stdev(clean))
    return statistics.median(spreads) if spreads else None

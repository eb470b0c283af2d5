"""What crosses from a job to tracking: plain data and the statistics over it (medians, spreads
between repetitions, totals), by metric name; no torch, so that tracking (and the analysis beside
it) import without the inference stack."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from falcon_exp import schema


@dataclass(frozen=True)
class Timing:
    prompt_tokens: int
    new_tokens: int
    generate_s: float
    ttft_ms: float
    decode_ms_per_token: float
    e2e_tokens_per_s: float  # new tokens over the whole call, prefill included
    cpu_wait_share: float  # the threads' wait for a CPU over the wall time (schema.CPU_WAIT_SHARE); nan where not reported
    itl_ms: tuple[float, ...] = ()  # the time between each two consecutive tokens (one per decode step)
    joules: float = float("nan")  # energy the model's devices drew over the generation; nan where not measured
    batch: int = 1  # sequences decoded together; the token counts and rates above are each sequence's (prompt_tokens padded)


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
    sequences: tuple[tuple[str, str], ...] = ()  # with batch_size > 1: every sequence's (prompt, output); the fields above hold the first's


@dataclass(frozen=True)
class Noise:
    """What the noise check found (falcon_exp/noise.py)."""

    replaced: list[Sample]  # the tries that re-runs replaced, kept apart (a generation run twice leaves two)
    still_off: int  # kept generations still off after the re-runs
    said: str | None  # what was found and done, for the run's tag; None on a quiet run

    @property
    def rerun(self) -> int:
        """The generations run again (each counted once, however often)."""
        return len({(s.prompt_index, s.repetition) for s in self.replaced})

    def summary(self) -> str:
        return noise_summary(self.rerun, self.still_off)


def noise_summary(rerun: int, still_off: int) -> str:
    """`2 re-run, 0 still off`: the noise tag's ending and the analysis' noise column."""
    return f"{rerun} re-run, {still_off} still off"


@dataclass(frozen=True)
class QuantizationReport:
    """What the loaded model really is."""

    linear_layers: int
    quantized_layers: int
    weights_bytes: int
    realised: str  # "4bit", "8bit" or "none"


@dataclass(frozen=True)
class Bandwidth:
    """A device's measured bandwidths, in bytes/s."""

    read: float  # the fastest read of a large buffer, bytes per second: the floor's denominator
    copy: float  # a large copy's bytes read plus written per second
    read_method: str  # the way of reading that was fastest (falcon_exp/roofline.py READS)
    readings: dict[str, float]  # bytes read per second by each way


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
    prepare_s: float | None  # building the fast decoder (compile, capture); None for eager
    fast_fallback: str | None  # why the fast path runs without the compilation asked for, or without CUDA graphs
    inductor_options: str  # options beyond inductor's defaults its compiled step was built with ("" for none)
    bandwidth: Bandwidth
    weight_bytes_per_step: int
    kv_bytes_per_token: float
    warmup_tokens: int  # generated untimed before the first timed generation
    backend_metrics: dict[str, float]  # the backend's own metrics (falcon_exp/backends/), by name
    backend_tags: dict[str, str]  # the backend's own tags, by name
    noise: Noise
    task_results: str | None  # lm-evaluation-harness's results file (JSON), where quality.tasks ran

    def columns(self) -> dict[str, list[float]]:
        """Each per-sample metric's values, in the order of `samples`."""
        return _columns(self.samples)

    def dropped_columns(self) -> dict[str, list[float]]:
        """The tries the noise check replaced, under `dropped/<name>`, with their prompt and repetition."""
        tries = self.noise.replaced
        if not tries:
            return {}
        return ({schema.dropped(key): values for key, values in _columns(tries).items()}
                | {schema.DROPPED_PROMPT: [s.prompt_index for s in tries], schema.DROPPED_REPETITION: [s.repetition for s in tries]})

    def figures(self) -> dict[str, float]:
        """The run's figures by metric name: token totals; the median of the floor and of every
        timed metric, with the spread between repetitions beside it; the decode rate of the median
        time; memory peaks over the generations; what the model holds; quality; bandwidths."""
        figures: dict[str, float] = {}
        for key, values in self.columns().items():
            if key in schema.TOKENS:  # every sequence's
                figures[schema.total(key)] = sum(value * sample.timing.batch for sample, value in zip(self.samples, values))
            elif (key in (schema.FLOOR_MS_PER_TOKEN, schema.CPU_WAIT_SHARE) or key in schema.TIMED or key in schema.ENERGY) and (
                    middle := median(values)) is not None:
                figures[key] = middle
                by_prompt: dict[int, list[float]] = {}
                for sample, value in zip(self.samples, values):
                    by_prompt.setdefault(sample.prompt_index, []).append(value)
                if key in schema.TIMED and (spread := repetition_std(by_prompt)) is not None:
                    figures[key + schema.REP_STD] = spread
        figures |= tail(self.samples)
        if (decode_ms := figures.get(schema.DECODE_MS_PER_TOKEN)) is not None:
            figures[schema.DECODE_TOKENS_PER_S] = 1000 / decode_ms
            figures[schema.AGGREGATE_TOKENS_PER_S] = self.samples[0].timing.batch * 1000 / decode_ms
        figures[schema.WARMUP_TOKENS_TOTAL] = self.warmup_tokens
        figures |= self.memory | {schema.WEIGHTS_GB: self.report.weights_bytes / schema.GB}
        figures |= {schema.LINEAR_LAYERS: self.report.linear_layers, schema.QUANTIZED_LAYERS: self.report.quantized_layers}
        figures |= self.backend_metrics | ({schema.LOAD_S: self.load_s} if self.load_s is not None else {}) | self.quality
        figures |= {schema.PREPARE_S: self.prepare_s} if self.prepare_s is not None else {}
        figures |= {schema.NOISE_RERUN: self.noise.rerun, schema.NOISE_OFF: self.noise.still_off}
        figures |= {schema.read_bandwidth(method): value / 1e9 for method, value in self.bandwidth.readings.items()}
        return figures | {schema.READ_BANDWIDTH_GBS: self.bandwidth.read / 1e9, schema.COPY_BANDWIDTH_GBS: self.bandwidth.copy / 1e9,
                          schema.WEIGHT_BYTES_PER_STEP_GB: self.weight_bytes_per_step / 1e9, schema.KV_BYTES_PER_TOKEN: self.kv_bytes_per_token}


def _columns(samples: list[Sample]) -> dict[str, list[float]]:
    timing = {schema.TTFT_MS: "ttft_ms", schema.DECODE_MS_PER_TOKEN: "decode_ms_per_token", schema.GENERATE_S: "generate_s",
              schema.E2E_TOKENS_PER_S: "e2e_tokens_per_s", schema.PROMPT_TOKENS: "prompt_tokens", schema.NEW_TOKENS: "new_tokens"}
    columns = {key: [getattr(s.timing, field) for s in samples] for key, field in timing.items()}
    if any(s.timing.cpu_wait_share == s.timing.cpu_wait_share for s in samples):  # where Linux reports it
        columns[schema.CPU_WAIT_SHARE] = [s.timing.cpu_wait_share for s in samples]
    if any(s.timing.joules == s.timing.joules for s in samples):  # where an energy counter was read
        columns[schema.JOULES_PER_TOKEN] = [s.timing.joules / (s.timing.new_tokens * s.timing.batch) for s in samples]
        columns[schema.MEAN_POWER_W] = [s.timing.joules / s.timing.generate_s for s in samples]
    columns[schema.FLOOR_MS_PER_TOKEN] = [s.floor_ms_per_token for s in samples]
    columns[schema.ROOFLINE_FRACTION] = [s.roofline_fraction for s in samples]
    return columns | {key: [s.memory[key] for s in samples] for key in samples[0].memory}


@dataclass(frozen=True)
class SweepNeeds:
    """What the jobs of a sweep will ask of the quality reference: its text as long as the
    longest continuation, and free to stop at end-of-sequence if any job may."""

    longest_new_tokens: int = 0
    stops_early: bool = False


def tail(samples: list[Sample]) -> dict[str, float]:
    """The percentiles of every inter-token latency and, where there are enough generations for
    one to mean something, of the TTFTs (schema.PERCENTILES)."""
    latencies = [ms for s in samples for ms in s.timing.itl_ms]
    figures = {schema.itl_percentile(p): nearest_rank(latencies, p) for p in schema.PERCENTILES} if latencies else {}
    ttfts = [s.timing.ttft_ms for s in samples]
    figures |= {schema.ttft_percentile(p): nearest_rank(ttfts, p) for p in schema.PERCENTILES if len(ttfts) * (100 - p) >= 100}
    return figures | {schema.ITL_COUNT: len(latencies)}


def nearest_rank(values: list[float], p: int) -> float:
    """The smallest value that at least p% of `values` do not exceed."""
    ordered = sorted(values)
    return ordered[max(0, -(-p * len(ordered) // 100) - 1)]


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

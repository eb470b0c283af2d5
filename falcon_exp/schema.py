"""Every name a run writes to MLflow, with its unit and what it means; torch-free.

Tracking writes through these names and the analysis reads through them, so a metric is named
in one place. Metric names carry their unit and group by prefix (time/, tokens/, memory/, quant/,
quality/, roofline/). A run-level timing metric is the median over the run's samples (prompt x
repetition); `<name>.rep_std` beside it is the spread between repetitions: the standard deviation
of each prompt's repetitions, then the median of that over prompts (absent with one repetition).
Each sample is also logged as `sample/<name>` at step `prompt_index * repetitions + repetition`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str
    unit: str
    meaning: str


def _metrics(*entries: Metric) -> dict[str, Metric]:
    return {m.key: m for m in entries}


# Per generation (logged per sample; the run-level value is the median over samples, and for
# what was timed, the spread between repetitions as .rep_std).
TTFT_MS = "time/ttft_ms"
DECODE_MS_PER_TOKEN = "time/decode_ms_per_token"
GENERATE_S = "time/generate_s"
E2E_TOKENS_PER_S = "time/e2e_tokens_per_s"
ROOFLINE_FRACTION = "roofline_fraction"
FLOOR_MS_PER_TOKEN = "roofline/floor_ms_per_token"
TIMED = _metrics(
    Metric(TTFT_MS, "ms", "time to first token: prefill and the first sampled token, device synchronised"),
    Metric(DECODE_MS_PER_TOKEN, "ms", "mean time per token after the first, within one generation"),
    Metric(GENERATE_S, "s", "the whole generation, tokenised input to last token"),
    Metric(E2E_TOKENS_PER_S, "1/s", "end-to-end rate: new tokens / generate_s (prefill included)"),
    Metric(ROOFLINE_FRACTION, "1", "floor_ms_per_token / decode_ms_per_token (1.0: decoding only streams memory)"),
)
FLOOR = Metric(FLOOR_MS_PER_TOKEN, "ms", "mean bytes a decode step reads (weights with scales, the KV cache as the decoder "
                                         "reads it) / read bandwidth: the fastest a step could be")
DECODE_TOKENS_PER_S = "time/decode_tokens_per_s"
AGGREGATE_TOKENS_PER_S = "time/aggregate_tokens_per_s"  # batch_size x decode_tokens_per_s: every sequence's tokens per second
PROMPT_TOKENS = "tokens/prompt_tokens"
NEW_TOKENS = "tokens/new_tokens"
TOKENS = (PROMPT_TOKENS, NEW_TOKENS)  # per sample; the run logs their sums as `<name>_total`
WARMUP_TOKENS_TOTAL = "tokens/warmup_tokens_total"
LOAD_S = "time/load_s"  # loading the weights (and quantizing them), when the job loaded its model
PREPARE_S = "time/fast_prepare_s"  # building the fast decoder: joining Falcon-7B's weights, compiling, capturing (cached: a repeat is cheap)

# Memory, per generation (reset before each) and as the run's peak over them.
PEAK_RSS_GB = "memory/peak_rss_gb"
PEAK_ALLOCATED_GB = "memory/peak_allocated_gb"
PEAK_RESERVED_GB = "memory/peak_reserved_gb"
PROCESS_GB = "memory/process_gb"
WEIGHTS_GB = "memory/weights_gb"
# A run's peak memory, whatever its device: the first of these it has (the allocator's peak summed
# over its GPUs, else the host's peak resident memory).
PEAK_MEMORY = (PEAK_ALLOCATED_GB, PEAK_RSS_GB)


def cuda_memory(index: int, name: str) -> str:
    """A per-GPU figure: `memory/cuda0/peak_allocated_gb`."""
    return f"memory/cuda{index}/{name.removeprefix('memory/')}"


MEMORY = _metrics(
    Metric(PEAK_RSS_GB, "GB", "the process's peak resident host memory during the generation (Linux VmHWM, reset before it)"),
    Metric(PEAK_ALLOCATED_GB, "GB", "the allocator's peak of allocated memory during the generation, per model GPU, and their sum "
                                    "(a sum of per-device peaks, which need not coincide in time)"),
    Metric(PEAK_RESERVED_GB, "GB", "as peak_allocated_gb, for memory the allocator reserved from the driver"),
    Metric(PROCESS_GB, "GB", "this process's memory on each model GPU as NVML reports it after the generation "
                             "(CUDA context, allocator reserve, libraries), and their sum"),
    Metric(WEIGHTS_GB, "GB", "bytes of every parameter and buffer once, with the tensors a backend's layers store beside "
                               "them or inside them (packed data, scales, zero points)"),
)
GB = 1e9  # memory figures are decimal gigabytes

QUANTIZED_LAYERS = "quant/quantized_layers"
LINEAR_LAYERS = "quant/linear_layers"
# A backend's own metrics and tags are declared by the backend (falcon_exp/backends/).

ROOFLINE = _metrics(
    Metric("roofline/read_bandwidth_gbs", "GB/s", "bytes read per second by the fastest of several reads of a large on-device "
                                                   "buffer (tag falcon_exp.read_method names it): the floor's denominator"),
    Metric("roofline/copy_bandwidth_gbs", "GB/s", "bytes read plus written per second by a large on-device copy (for comparison)"),
    Metric("roofline/weight_bytes_per_step_gb", "GB", "weight bytes one decode step reads (one row of an untied input embedding)"),
    Metric("roofline/kv_bytes_per_token", "bytes", "KV-cache bytes the model stores per token of context"),
)
READ_BANDWIDTH_GBS, COPY_BANDWIDTH_GBS, WEIGHT_BYTES_PER_STEP_GB, KV_BYTES_PER_TOKEN = ROOFLINE


def read_bandwidth(method: str) -> str:
    """`roofline/read_bandwidth_gemv_bf16_gbs`: GB/s read by one way (falcon_exp/roofline.py READS)."""
    return f"roofline/read_bandwidth_{method}_gbs"

# Quality against the unquantized reference (falcon_exp/quality.py).
KL_MEAN = "quality/kl_mean"
KL_MAX = "quality/kl_max"
TOP1_AGREEMENT = "quality/top1_agreement"
GREEDY_MATCH = "quality/greedy_match"
COMMON_PREFIX_TOKENS = "quality/common_prefix_tokens"
LANGUAGES = ("en", "zh")


# On a corpus the user names (quality.corpus; falcon_exp/corpus.py).
CORPUS_PERPLEXITY = "quality/corpus_perplexity"
CORPUS_PERPLEXITY_RATIO = "quality/corpus_perplexity_ratio"
CORPUS_TOKENS = "quality/corpus_tokens"
CORPUS_KL_TOKENS = "quality/corpus_kl_tokens"
CORPUS_KL_MEAN = "quality/corpus_kl_mean"
CORPUS_KL_MEAN_STDERR = "quality/corpus_kl_mean_stderr"
CORPUS_KL_MEDIAN = "quality/corpus_kl_median"
CORPUS_KL_P99 = "quality/corpus_kl_p99"
CORPUS_KL_MAX = "quality/corpus_kl_max"
CORPUS_DELTA_P_MEAN = "quality/corpus_delta_p_mean"
CORPUS_DELTA_P_RMS = "quality/corpus_delta_p_rms"
CORPUS_SAME_TOP = "quality/corpus_same_top"
CORPUS_SAME_TOP_STDERR = "quality/corpus_same_top_stderr"
CORPUS = _metrics(
    Metric(CORPUS_PERPLEXITY, "1", "perplexity of the corpus: transformers' sliding-window recipe (quality.corpus_context, "
                                   "quality.corpus_stride), exp of the mean NLL over every scored token"),
    Metric(CORPUS_PERPLEXITY_RATIO, "1", "corpus_perplexity over the unquantized reference's, same tokens and windows"),
    Metric(CORPUS_TOKENS, "count", "the corpus tokens scored: all of the text (cut to quality.corpus_tokens) but its first, and "
                                   "with non-overlapping windows each window's first"),
    Metric(CORPUS_KL_TOKENS, "count", "the scored tokens the KL statistics cover (the first quality.kl_tokens)"),
    Metric(CORPUS_KL_MEAN, "nats", "mean KL(reference || run) of next-token distributions, over the reference's top tokens and "
                                   "the rest as one outcome (a lower bound on the full KL)"),
    Metric(CORPUS_KL_MEAN_STDERR, "nats", "standard error of corpus_kl_mean (standard deviation / sqrt(tokens))"),
    Metric(CORPUS_KL_MEDIAN, "nats", "median of that per-token KL"),
    Metric(CORPUS_KL_P99, "nats", "99th percentile of that per-token KL"),
    Metric(CORPUS_KL_MAX, "nats", "largest per-token KL"),
    Metric(CORPUS_DELTA_P_MEAN, "1", "mean over tokens of the run's probability of the reference's top token minus the reference's"),
    Metric(CORPUS_DELTA_P_RMS, "1", "root mean square of that difference"),
    Metric(CORPUS_SAME_TOP, "1", "share of tokens where the run's most likely next token is the reference's"),
    Metric(CORPUS_SAME_TOP_STDERR, "1", "standard error of corpus_same_top (binomial)"),
)


TASK_PREFIX = "quality/task/"


def task_metric(task: str, metric: str) -> str:
    """`quality/task/arc_easy/acc`, `.../acc_stderr`: an lm-evaluation-harness task's metric (falcon_exp/tasks.py)."""
    return f"{TASK_PREFIX}{task}/{metric}"


def is_stderr(key: str) -> bool:
    """Whether a quality metric is another's standard error (stderr_of's names)."""
    return "_stderr" in key.rpartition("/")[2]


def stderr_of(key: str) -> str:
    """The name of a quality metric's standard error: `quality/corpus_kl_mean_stderr`, and lm-eval's
    way for a task's, `quality/task/gsm8k/exact_match_stderr.strict-match`."""
    if key.startswith(TASK_PREFIX):
        metric, dot, filtered = key.rpartition("/")[2].partition(".")
        return f"{key.rpartition('/')[0]}/{metric}_stderr{dot}{filtered}"
    return f"{key}_stderr"


def perplexity(lang: str) -> str:
    return f"quality/perplexity_{lang}"


def perplexity_ratio(lang: str) -> str:
    return f"quality/perplexity_{lang}_ratio"


# The tail: percentiles over every inter-token latency of a run's kept generations (the time
# between two of a generation's tokens, one per decode step), and over its generations' TTFT.
# Nearest rank: the smallest value that at least p% of the values do not exceed, one that
# occurred. A TTFT percentile needs 100 / (100 - p) generations at least (p90: 10, p99: 100).
PERCENTILES = (50, 90, 99)
ITL_COUNT = "time/itl_count"


def itl_percentile(p: int) -> str:
    """`time/itl_p99_ms`: the p-th percentile of the run's inter-token latencies."""
    return f"time/itl_p{p}_ms"


def ttft_percentile(p: int) -> str:
    """`time/ttft_p90_ms`: the p-th percentile of the run's times to first token."""
    return f"time/ttft_p{p}_ms"


TAIL = _metrics(
    *(Metric(itl_percentile(p), "ms", f"{p}th percentile (nearest rank) of the inter-token latencies of every kept timed "
                                      "generation; beside decode_ms_per_token, the median of each generation's mean") for p in PERCENTILES),
    *(Metric(ttft_percentile(p), "ms", f"{p}th percentile (nearest rank) of the kept generations' TTFT, where there are at least "
                                       f"{-(-100 // (100 - p))} of them") for p in PERCENTILES),
    Metric(ITL_COUNT, "count", "the inter-token latencies the itl percentiles are over"),
)

# Energy the model's devices drew during a generation: NVML's total-energy counter of every GPU that
# holds the model, or on a CPU the RAPL package counters (/sys/class/powercap); idle power included.
JOULES_PER_TOKEN = "energy/joules_per_token"
MEAN_POWER_W = "energy/mean_power_w"
ENERGY = _metrics(
    Metric(JOULES_PER_TOKEN, "J", "per generation, the joules drawn from its start to its last token over the tokens it "
                                  "generated, every sequence's (prefill included, idle power not subtracted); the run's: the median"),
    Metric(MEAN_POWER_W, "W", "per generation, those joules over generate_s; the run's: the median"),
)

# A busy machine, said (falcon_exp/noise.py).
CPU_WAIT_SHARE = "noise/cpu_wait_share"
NOISE_RERUN = "noise/rerun_generations"
NOISE_OFF = "noise/off_generations"
NOISE = _metrics(
    Metric(CPU_WAIT_SHARE, "1", "per generation, the time this process's threads were ready to run but waited for a CPU (Linux "
                                "schedstat), over the wall time x the threads that compute (torch's on a CPU run, one on a GPU "
                                "run); the run's: the median. 0 on a quiet machine; another busy process raises it"),
    Metric(NOISE_RERUN, "count", "generations found off (noise.max_ratio, noise.max_cpu_wait) and run again; every try a re-run replaced are "
                                 "logged as dropped/<name>, never among the samples"),
    Metric(NOISE_OFF, "count", "kept generations still off after the re-runs (the run is then tagged falcon_exp.noise)"),
)
DROPPED = "dropped/"  # a try a re-run replaced, at step = the order it was replaced in
DROPPED_PROMPT = "dropped/prompt_index"  # which prompt and repetition that try was (from 0)
DROPPED_REPETITION = "dropped/repetition"


def dropped(key: str) -> str:
    """`dropped/time/decode_ms_per_token`: a sample metric of a generation the noise check replaced."""
    return f"{DROPPED}{key}"


SAMPLE = "sample/"
REP_STD = ".rep_std"


def sample(key: str) -> str:
    return f"{SAMPLE}{key}"


def total(key: str) -> str:
    return f"{key}_total"


# Names a run writes only in some circumstances, and when.
CONDITIONAL = {
    PEAK_ALLOCATED_GB: "on a GPU", PEAK_RESERVED_GB: "on a GPU", PROCESS_GB: "on a GPU whose NVML sees the process",
    LOAD_S: "when the job loaded its model (not when it reused the last job's)",
    PREPARE_S: "with generation.fast",
    CPU_WAIT_SHARE: "where Linux reports each thread's run-queue wait (/proc/self/task/*/schedstat)",
    **{ttft_percentile(p): f"with at least {-(-100 // (100 - p))} kept generations" for p in PERCENTILES},
    **{key: "where the device has an energy counter (NVML on a GPU, RAPL on a CPU); else falcon_exp.unmeasured says why"
       for key in ENERGY},
    **{key: "with quality.corpus set" for key in (CORPUS_PERPLEXITY, CORPUS_TOKENS)},
    **{key: "with quality.corpus set, against an unquantized reference" for key in CORPUS if key not in (CORPUS_PERPLEXITY, CORPUS_TOKENS)},
}

# Tags.
TAG_MODEL = "falcon_exp.model"
TAG_WEIGHTS = "falcon_exp.weights"
TAG_MODE = "falcon_exp.mode"
TAG_DEVICE = "falcon_exp.device"
TAG_MODEL_REUSED = "falcon_exp.model_reused"
TAG_DECODE_PATH = "falcon_exp.decode_path"
TAG_FAST_FALLBACK = "falcon_exp.fast_fallback"
TAG_INDUCTOR_OPTIONS = "falcon_exp.inductor_options"  # inductor options beyond its defaults that the fast path's compiled step was built with
TAG_QUANTIZATION_REALISED = "falcon_exp.quantization_realised"
TAG_QUANTIZATION_SOURCE = "falcon_exp.quantization_source"
TAG_UNMEASURED = "falcon_exp.unmeasured"
TAG_ROOFLINE_WARNING = "falcon_exp.roofline_warning"
TAG_READ_METHOD = "falcon_exp.read_method"  # the way of reading that gave roofline/read_bandwidth_gbs
TAG_NOISE = "falcon_exp.noise"  # what the noise check found, when it found a generation off
TAG_SWEEP_DIR = "falcon_exp.sweep_dir"  # on a sweep's parent run
TAG_BATCH_PROMPTS = "falcon_exp.batch_prompts"  # with batch_size > 1: how many distinct prompts a batch holds
# On a sweep's parent run: the ids of earlier runs that stand for the jobs resume=true skipped,
# space-separated, 200 a tag (then in falcon_exp.reused_runs.1, .2, ...).
TAG_REUSED_RUNS = "falcon_exp.reused_runs"
REUSED_RUNS_PER_TAG = 200
TAG_CONFIG_HASH = "falcon_exp.config_hash"
TAG_ERROR = "falcon_exp.error"
TAG_PROCESS = "falcon_exp.process"  # host:pid of the process that ran it
TAG_SLURM_JOB = "slurm.job_id"  # the SLURM job (array_task) that ran it
TAG_TEXT = "falcon_exp.text"
TAG_OUTPUT_DIR = "falcon_exp.output_dir"
TAG_UNTESTED_VERSIONS = "falcon_exp.untested_versions"
# The machine and software that produced a run (falcon_exp/environment.py).
TAG_GIT_COMMIT = "git.commit"
TAG_GIT_DIRTY = "git.dirty"  # true, false, or unknown (a commit named by FALCON_EXP_GIT_COMMIT)
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own (the UI's Version column): always TAG_GIT_COMMIT's value
MLFLOW_GIT_BRANCH = "mlflow.source.git.branch"
TAG_HOST = "host"
TAG_PYTHON = "python"
TAG_CPU = "cpu"
TAG_CPU_CORES = "cpu.cores"
TAG_CPU_CAPABILITY = "cpu.capability"  # torch's vector capability, e.g. AVX2 or AVX512
TAG_TORCH_THREADS = "torch.threads"
TAG_DEVICE_KIND = "device"  # cpu or cuda
TAG_DEVICE_NAME = "device.name"
TAG_DEVICE_NAMES = "device.names"
TAG_DEVICE_COUNT = "device.count"
TAG_DEVICE_DRIVER = "device.driver"
TAG_DEVICE_CUDA = "device.cuda"


def version_tag(package: str) -> str:
    """`version.torch`: the installed version of a package a run depends on."""
    return f"version.{package}"


# Params beside the config's own: the short mode name (nf4, int8, ao-int4, bf16, ...) and the scheme.
PARAM_MODE = "mode"
PARAM_SCHEME = "scheme"

CONDITIONAL |= {
    TAG_FAST_FALLBACK: "when generation.fast runs without the compilation it was asked for, or without a CUDA graph",
    TAG_UNMEASURED: "when a figure could not be measured (it then has no value)",
    TAG_ROOFLINE_WARNING: "when a sample decodes faster than the floor allows",
    TAG_TEXT: "for synthetic weights",
    TAG_UNTESTED_VERSIONS: "when a library falcon-exp patches is at a version it was not tested with",
    TAG_SLURM_JOB: "in a SLURM job",
    TAG_REUSED_RUNS: "on a resumed sweep's parent run, when resume=true skipped a job",
    TAG_NOISE: "when a generation was off: which, by how much, the likely cause, what was re-run",
    TAG_BATCH_PROMPTS: "with batch_size > 1",
}

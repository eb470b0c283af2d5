"""The comparison table: a row per run (mode and what the sweep varied), the logged metrics as
they are, the spread between repetitions, and ratios against a reference mode."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pandas as pd

from falcon_exp import backends, compat, schema
from falcon_exp.analysis.load import BACKEND, MODE, SCHEME
from falcon_exp.cache import replaced
from falcon_exp.records import noise_summary

PEAK_GB = "memory/peak_gb"  # the analysis' own column: allocator peak where there was a GPU, else host RSS
# (metric key, column title); a timing column is shown as "median ± spread between repetitions".
COLUMNS = (
    (schema.WEIGHTS_GB, "weights GB"),
    (PEAK_GB, "peak GB"),
    (schema.TTFT_MS, "TTFT ms"),
    (schema.DECODE_MS_PER_TOKEN, "decode ms/token"),
    (schema.itl_percentile(99), "ITL p99 ms"),
    (schema.DECODE_TOKENS_PER_S, "decode tokens/s"),
    (schema.AGGREGATE_TOKENS_PER_S, "aggregate tokens/s"),
    (schema.E2E_TOKENS_PER_S, "end-to-end tokens/s"),
    (schema.GENERATE_S, "generate s"),
)
# Quality columns, shown where the runs logged them.
QUALITY = (
    (schema.KL_MEAN, "KL vs ref"),
    (schema.TOP1_AGREEMENT, "top-1 agree"),
    (schema.GREEDY_MATCH, "greedy match"),
    (schema.perplexity("en"), "ppl en"),
    (schema.perplexity("zh"), "ppl zh"),
    (schema.CORPUS_PERPLEXITY_RATIO, "corpus ppl vs ref"),
    (schema.CORPUS_KL_MEAN, "corpus KL"),
    (schema.CORPUS_KL_P99, "corpus KL p99"),
    (schema.CORPUS_SAME_TOP, "corpus same top"),
)


def task_columns(runs: pd.DataFrame) -> list[str]:
    """The lm-eval task metrics the runs logged (not their standard errors), sorted."""
    return sorted(c for c in runs if c.startswith(schema.TASK_PREFIX) and not schema.is_stderr(c))
SPREAD = (schema.TTFT_MS, schema.DECODE_MS_PER_TOKEN, schema.E2E_TOKENS_PER_S, schema.GENERATE_S)
# The analysis' own columns beside each SPREAD key: the lowest and highest of the repetitions' medians.
REP_LOW, REP_HIGH = " rep low", " rep high"
SPREAD_NOTE = ("Timing columns: median over prompts x repetitions [the lowest, the highest of the repetitions' medians, each "
               "the median over prompts of one repetition; none with one repetition]. Ratios: each run against the reference "
               "mode's run of the same other settings. Quality: ± its standard error where the run logged one "
               "(corpus KL and same-top rate over its tokens, lm-eval's for a task).")
NOISE_NOTE = ("noise: generations a busy machine disturbed (over noise.max_ratio x their prompt's quickest, or waiting for a CPU "
              "over noise.max_cpu_wait of their time), run again, and those still off after the re-runs, which stay in the medians.")
RATIOS = (schema.WEIGHTS_GB, PEAK_GB, schema.DECODE_MS_PER_TOKEN)
# Config keys that identify a configuration when a sweep varies them (each backend's own settings after the mode's).
KEYS = ("model.name", MODE, BACKEND, "generation.fast", "generation.compile", "batch_size", "setting", "bits", "prompts.name", "max_length",
        "max_new_tokens",
        *(f"quantization.{b.name}.{f.name}" for b in backends.REGISTRY.values() for f in dataclasses.fields(b.settings)),
        "dtype", "force_length", "quality.corpus", "quality.corpus_context", "quality.corpus_stride", "quality.corpus_tokens",
        "quality.kl_tokens", "quality.tasks", "quality.limit")
BASELINES = ("bf16", "fp16", "fp32")  # the unquantized modes, by dtype
MODE_ORDER = {m: i for i, m in enumerate([mode.mode for mode in backends.modes()] + list(BASELINES))}


def column(frame: pd.DataFrame, key: str, default: object = float("nan")) -> pd.Series:
    """A logged column, or `default` in every row where no run logged `key`."""
    return frame.get(key, pd.Series(default, index=frame.index))


def peak_memory(frame: pd.DataFrame, prefix: str = "") -> pd.Series:
    """The allocator's peak summed over GPUs where there was a GPU, else the host's peak RSS;
    of runs (prefix "") or of samples (prefix `sample/`). NaN where neither was measured."""
    first, *others = (column(frame, prefix + key) for key in schema.PEAK_MEMORY)
    return functools.reduce(lambda peak, other: peak.fillna(other), others, first)


def varying(runs: pd.DataFrame) -> list[str]:
    """The identifying config keys that tell the runs apart: mode always, then each key whose
    value is not already fixed by the keys before it (a setting fixes its quantization knobs)."""
    chosen = [MODE]
    text = runs.astype(str)
    for key in KEYS:
        if key in chosen or key not in runs:
            continue
        if text.groupby(chosen)[key].nunique().max() > 1 or (key == BACKEND and spans_backends(runs)):
            chosen.append(key)  # the backend, fixed by the mode, is shown wherever the runs span backends
    return chosen


def spans_backends(runs: pd.DataFrame) -> bool:
    """Whether the quantized runs come from more than one backend (the baseline has none)."""
    return runs.loc[runs[BACKEND] != "none", BACKEND].nunique() > 1


def ordered(runs: pd.DataFrame) -> pd.DataFrame:
    """A stable order: by model, mode, then every varying key, then start time."""
    keys = [k for k in ("model.name",) + tuple(varying(runs)) if k in runs]
    frame = runs.assign(_mode=runs[MODE].map(MODE_ORDER).fillna(99))
    return frame.sort_values(["_mode" if k == MODE else k for k in keys] + ["start_time", "run_id"], kind="stable").drop(columns="_mode")


def reference_mode(runs: pd.DataFrame) -> str | None:
    """Ratios are against the unquantized baseline when the runs have one, else against the first
    8-bit mode (LLM.int8 beside NF4, as the article compared them)."""
    modes = set(runs[MODE])
    return next((m for m in (*BASELINES, *(mode.mode for mode in backends.modes() if mode.bits == 8)) if m in modes), None)


def repetition_range(samples: pd.DataFrame, key: str) -> pd.DataFrame:
    """Each run's spread between repetitions as a range a quantity can have: the lowest and the
    highest of its repetitions' medians (each over the prompts), by run_id; none with one repetition."""
    per_repetition = samples.groupby(["run_id", "repetition"])[schema.SAMPLE + key].median().groupby("run_id")
    spread = per_repetition.agg(["min", "max", "count"])
    return spread.loc[spread["count"] > 1, ["min", "max"]].set_axis([REP_LOW, REP_HIGH], axis=1)


def noise_said(runs: pd.DataFrame) -> pd.Series:
    """`1 re-run, 0 still off` where the noise check found a generation off, else empty."""
    rerun, off = column(runs, schema.NOISE_RERUN), column(runs, schema.NOISE_OFF)
    found = column(runs, schema.TAG_NOISE, None).notna()
    return pd.Series([noise_summary(int(r), int(o)) if f else "" for r, o, f in zip(rerun, off, found)], index=runs.index)


def comparison(runs: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """Numbers exactly as logged (medians, the spread as logged), the range between repetitions
    from the samples, what the noise check found, and ratios to the reference mode."""
    runs = ordered(runs.assign(**{PEAK_GB: peak_memory(runs)}))
    keys = varying(runs)
    table = pd.DataFrame({key: column(runs, key) for key in keys + [c for c, _ in COLUMNS]})
    quality = [c for c, _ in QUALITY if c in runs] + task_columns(runs)
    errors = [schema.stderr_of(c) for c in quality if schema.stderr_of(c) in runs]
    table = table.join(runs[quality + errors])
    for key in SPREAD:
        table[key + schema.REP_STD] = column(runs, key + schema.REP_STD)
        if schema.SAMPLE + key in samples:
            spread = runs[["run_id"]].join(repetition_range(samples, key), on="run_id")
            table[[key + REP_LOW, key + REP_HIGH]] = spread[[REP_LOW, REP_HIGH]].to_numpy()
    if schema.TAG_NOISE in runs:
        table["noise"] = noise_said(runs)
    reference = reference_mode(runs)
    if reference is not None:  # each run against the reference run of the same other settings
        on = ["_join"] + [k for k in keys if k not in (MODE, "bits", BACKEND)]  # a mode names its backend
        left = runs.assign(_join=0)[on + list(RATIOS)]
        right = left[runs[MODE].to_numpy() == reference].drop_duplicates(on)
        merged = left.merge(right, on=on, how="left", suffixes=("", "@ref"))
        for key in RATIOS:
            table[f"{key} / {reference}"] = (merged[key] / merged[f"{key}@ref"]).to_numpy()
    return table.reset_index(drop=True)


def _formatted(table: pd.DataFrame) -> pd.DataFrame:
    """For Markdown and LaTeX: medians [the repetitions' range], four significant places."""
    errors = [schema.stderr_of(c) for c in table if schema.stderr_of(c) in table]
    shown = table[[c for c in table if not c.endswith((schema.REP_STD, REP_LOW, REP_HIGH)) and c not in errors]].copy()
    for key, title in COLUMNS:
        if key in SPREAD:
            low, high = column(table, key + REP_LOW), column(table, key + REP_HIGH)
            shown[key] = [f"{m:.4g}" + ("" if pd.isna(lo) else f" [{lo:.4g}, {hi:.4g}]") for m, lo, hi in zip(table[key], low, high)]
        else:
            shown[key] = table[key].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
        shown = shown.rename(columns={key: title})
    tasks = [(key, key.removeprefix(schema.TASK_PREFIX)) for key in task_columns(table)]  # `arc_easy/acc`
    for key, title in (*QUALITY, *tasks):
        if key in shown:
            error = column(table, schema.stderr_of(key))
            shown[key] = ["" if pd.isna(v) else f"{v:.4g}" + ("" if pd.isna(e) else f" ± {e:.2g}") for v, e in zip(table[key], error)]
            shown = shown.rename(columns={key: title})
    titles = dict(COLUMNS)
    for ratio in [c for c in shown if " / " in c]:
        key, reference = ratio.rsplit(" / ", 1)
        shown[ratio] = shown[ratio].map(lambda v: "" if pd.isna(v) else f"{v:.2f}x")
        shown = shown.rename(columns={ratio: f"{titles[key]} vs {reference}"})
    return shown


def write(table: pd.DataFrame, directory: Path, stem: str = "comparison") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}.{suffix}" for suffix in ("csv", "md", "tex")]
    save_csv(table, paths[0])
    shown = _formatted(table)
    note = SPREAD_NOTE + (" " + NOISE_NOTE if "noise" in table else "")
    for path, text in zip(paths[1:], (_markdown(shown) + "\n" + note + "\n", shown.to_latex(index=False, escape=True, caption=note))):
        with replaced(path) as staging:
            staging.write_text(text)
    return paths


def save_csv(frame: pd.DataFrame, path: Path) -> None:
    """A table as CSV, numbers to ten significant digits, written whole or not at all."""
    with replaced(path) as staging:
        frame.to_csv(staging, index=False, float_format="%.10g", lineterminator="\n")


def _markdown(frame: pd.DataFrame) -> str:
    """A GitHub table (pandas' own needs the optional tabulate package)."""
    cells = [[str(c) for c in frame.columns]] + [[str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + "|".join(" --- " for _ in frame.columns) + "|")
    return "\n".join(lines) + "\n"


# The flat results file that experiments/results/ keeps: one row per run, plain names.
RESULT_COLUMNS = {
    schema.TAG_DEVICE_NAME: "device",
    "model.name": "model",
    "model.weights": "weights",
    "setting": "setting",
    MODE: "mode",
    BACKEND: "backend",
    SCHEME: "scheme",
    "bits": "bits",
    "max_length": "max_length",
    "batch_size": "batch_size",
    "force_length": "force_length",
    "repetitions": "repetitions",
    schema.WEIGHTS_GB: "weights_gb",
    PEAK_GB: "peak_memory_gb",
    schema.PEAK_RESERVED_GB: "peak_reserved_gb",
    schema.DECODE_MS_PER_TOKEN: "ms_per_token",
    schema.DECODE_MS_PER_TOKEN + schema.REP_STD: "ms_per_token_rep_std",
    schema.TTFT_MS: "ttft_ms",
    schema.DECODE_TOKENS_PER_S: "decode_tokens_per_s",
    schema.AGGREGATE_TOKENS_PER_S: "aggregate_tokens_per_s",
    schema.E2E_TOKENS_PER_S: "e2e_tokens_per_s",
    schema.GENERATE_S: "generate_s",
    schema.total(schema.NEW_TOKENS): "new_tokens_total",
    schema.LOAD_S: "load_s",
    schema.itl_percentile(50): "itl_p50_ms",
    schema.itl_percentile(99): "itl_p99_ms",
    schema.JOULES_PER_TOKEN: "joules_per_token",
    schema.MEAN_POWER_W: "mean_power_w",
    "generation.fast": "fast",
    "generation.compile": "compile",
    schema.TAG_DECODE_PATH: "decode_path",
    schema.FLOOR_MS_PER_TOKEN: "floor_ms_per_token",
    schema.ROOFLINE_FRACTION: schema.ROOFLINE_FRACTION,  # a plain name already
    schema.KL_MEAN: "kl_mean",
    schema.TOP1_AGREEMENT: "top1_agreement",
    schema.perplexity("en"): "perplexity_en",
    schema.perplexity("zh"): "perplexity_zh",
    schema.TAG_GIT_COMMIT: "commit",
    "run_id": "run_id",
}


def results(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run with the columns experiments/results/*.csv promise."""
    runs = ordered(runs.assign(**{PEAK_GB: peak_memory(runs)}))
    present = {k: v for k, v in RESULT_COLUMNS.items() if k in runs}
    return runs[list(present)].rename(columns=present).reset_index(drop=True)


def roofline(runs: pd.DataFrame) -> pd.DataFrame:
    """Eager against fast decoding, one row per run: `mode` is eager or fast here, `quant` the
    weights' mode and `settings` its backend's settings that apply (LLM.int8's outlier threshold
    decides whether a graph can hold it);
    the floor as logged and its inputs, the path the fast decoder took and the commit that ran.
    Runs of earlier releases logged a floor against the copy bandwidth and no floor of their own:
    their `bandwidth` column says so and their floor is left empty."""
    runs = ordered(runs.assign(**{PEAK_GB: peak_memory(runs)}))
    fast = column(runs, "generation.fast", False).astype(str).str.lower() == "true"
    read = column(runs, schema.READ_BANDWIDTH_GBS)
    backend = column(runs, BACKEND, "")
    table = pd.DataFrame({
        "device": column(runs, schema.TAG_DEVICE_NAME, None).fillna(column(runs, schema.TAG_DEVICE, "")),
        "model": runs["model.name"],
        "bits": runs["bits"],
        "mode": fast.map({True: "fast", False: "eager"}),
        "ms_per_token": runs[schema.DECODE_MS_PER_TOKEN],
        schema.ROOFLINE_FRACTION: runs[schema.ROOFLINE_FRACTION],
        "peak_memory_gb": runs[PEAK_GB],
        "quant": runs[MODE],
        "backend": backend,
        "settings": settings_applying(runs),
        "new_tokens": column(runs, "max_new_tokens"),
        "floor_ms_per_token": column(runs, schema.FLOOR_MS_PER_TOKEN),
        "bandwidth": read.notna().map({True: "read", False: "copy"}),
        "read_bandwidth_gbs": read,
        "read_method": column(runs, schema.TAG_READ_METHOD, None).fillna(read.notna().map({True: compat.READ_METHOD_BEFORE_03, False: ""})),
        "copy_bandwidth_gbs": column(runs, schema.COPY_BANDWIDTH_GBS),
        "weight_bytes_per_step_gb": column(runs, schema.WEIGHT_BYTES_PER_STEP_GB),
        "decode_path": column(runs, schema.TAG_DECODE_PATH, "eager"),
        "fallback": column(runs, schema.TAG_FAST_FALLBACK, "").fillna(""),
        "commit": short_commits(column(runs, schema.TAG_GIT_COMMIT, "").fillna("")),
        "run_id": runs["run_id"],
    })
    return table.reset_index(drop=True)


def short_commits(commits: pd.Series) -> pd.Series:
    """A full git hash as its first 7 digits; any other name (FALCON_EXP_GIT_COMMIT's, such as
    `c62cfee+async`) whole, since its tail is what tells it apart."""
    return commits.str.replace(r"^([0-9a-f]{7})[0-9a-f]{33}$", r"\1", regex=True)


def settings_applying(runs: pd.DataFrame) -> pd.Series:
    """`int8_threshold=0.0`: each quantized run's backend settings that apply at its bits."""
    def shown(run: pd.Series) -> str:
        if run[BACKEND] not in backends.names() or run["bits"] == 16:
            return ""
        return ", ".join(f"{k}={run.get(f'quantization.{run[BACKEND]}.{k}')}" for k in backends.get(run[BACKEND]).knobs(run["bits"]))

    return runs.apply(shown, axis=1) if len(runs) else pd.Series(dtype=object)

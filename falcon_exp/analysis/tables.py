"""The comparison table: a row per run (mode and what the sweep varied), the logged metrics as
they are, their spread over repetitions, and ratios against a reference mode."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

# (metric key, column title); each timing column gets its [p25, p75] from the logged spread.
COLUMNS = (
    ("memory/weights_gb", "weights GB"),
    ("memory/peak_gb", "peak GB"),
    ("time/ttft_ms", "TTFT ms"),
    ("time/decode_ms_per_token", "decode ms/token"),
    ("time/tokens_per_s", "tokens/s"),
    ("time/generate_s", "generate s"),
)
# Quality columns, shown where the runs logged them.
QUALITY = (
    ("quality/kl_mean", "KL vs ref"),
    ("quality/top1_agreement", "top-1 agree"),
    ("quality/greedy_match", "greedy match"),
    ("quality/perplexity_en", "ppl en"),
    ("quality/perplexity_zh", "ppl zh"),
)
SPREAD = ("time/ttft_ms", "time/decode_ms_per_token", "time/tokens_per_s", "time/generate_s")
RATIOS = ("memory/weights_gb", "memory/peak_gb", "time/decode_ms_per_token")
# Config keys that identify a configuration when a sweep varies them.
KEYS = ("model.name", "mode", "generation.fast", "setting", "bits", "prompts.name", "max_length", "max_new_tokens",
        "quantization.quant_type", "quantization.compute_dtype", "quantization.double_quant", "quantization.int8_threshold", "dtype", "force_length")
MODE_ORDER = {"nf4": 0, "fp4": 1, "int8": 2, "bf16": 3, "fp16": 4, "fp32": 5}


def column(frame: pd.DataFrame, key: str, default=float("nan")) -> pd.Series:
    """A logged column, or `default` in every row where no run logged `key`."""
    return frame.get(key, pd.Series(default, index=frame.index))


def peak_memory(frame: pd.DataFrame, prefix: str = "memory/") -> pd.Series:
    """The allocator's peak summed over GPUs where there was a GPU, else the host's peak RSS;
    of runs (`memory/...`) or of samples (`sample/memory/...`)."""
    gpu = column(frame, f"{prefix}peak_allocated_gb")
    return gpu.fillna(frame[f"{prefix}peak_rss_gb"])


def varying(runs: pd.DataFrame) -> list[str]:
    """The identifying config keys that tell the runs apart: mode always, then each key whose
    value is not already fixed by the keys before it (a setting fixes its quantization knobs)."""
    chosen = ["mode"]
    text = runs.astype(str)
    for key in KEYS:
        if key in chosen or key not in runs:
            continue
        if text.groupby(chosen)[key].nunique().max() > 1:
            chosen.append(key)
    return chosen


def ordered(runs: pd.DataFrame) -> pd.DataFrame:
    """A stable order: by model, mode, then every varying key, then start time."""
    keys = [k for k in ("model.name",) + tuple(varying(runs)) if k in runs]
    frame = runs.assign(_mode=runs["mode"].map(MODE_ORDER).fillna(99))
    return frame.sort_values(["_mode" if k == "mode" else k for k in keys] + ["start_time", "run_id"], kind="stable").drop(columns="_mode")


def reference_mode(runs: pd.DataFrame) -> str | None:
    """Ratios are against the unquantized baseline when the runs have one, else against int8."""
    modes = set(runs["mode"])
    return next((m for m in ("bf16", "fp16", "fp32", "int8") if m in modes), None)


def comparison(runs: pd.DataFrame) -> pd.DataFrame:
    """Numbers exactly as logged (medians and quartiles), plus ratios to the reference mode."""
    runs = ordered(runs.assign(**{"memory/peak_gb": peak_memory(runs)}))
    keys = varying(runs)
    table = runs[keys + [c for c, _ in COLUMNS] + [c for c, _ in QUALITY if c in runs]].copy()
    for key in SPREAD:
        for q in ("p25", "p75"):
            table[f"{key}.{q}"] = runs[f"{key}.{q}"] if f"{key}.{q}" in runs else float("nan")
    reference = reference_mode(runs)
    if reference is not None:  # each run against the reference run of the same other settings
        on = ["_join"] + [k for k in keys if k not in ("mode", "bits")]
        left = runs.assign(_join=0)[on + list(RATIOS)]
        right = left[runs["mode"].to_numpy() == reference].drop_duplicates(on)
        merged = left.merge(right, on=on, how="left", suffixes=("", "@ref"))
        for key in RATIOS:
            table[f"{key} / {reference}"] = (merged[key] / merged[f"{key}@ref"]).to_numpy()
    return table.reset_index(drop=True)


def _formatted(table: pd.DataFrame) -> pd.DataFrame:
    """For Markdown and LaTeX: medians with their [p25, p75], three significant places."""
    shown = table[[c for c in table if not c.endswith((".p25", ".p75"))]].copy()
    for key, title in COLUMNS:
        if key in SPREAD:
            shown[key] = [
                f"{m:.4g} [{lo:.4g}, {hi:.4g}]" for m, lo, hi in zip(table[key], table[f"{key}.p25"], table[f"{key}.p75"])
            ]
        else:
            shown[key] = table[key].map(lambda v: f"{v:.4g}")
        shown = shown.rename(columns={key: title})
    for key, title in QUALITY:
        if key in shown:
            shown[key] = table[key].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
            shown = shown.rename(columns={key: title})
    for column in [c for c in shown if " / " in c]:
        shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.2f}x")
    return shown


def write(table: pd.DataFrame, directory: Path, stem: str = "comparison") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}.{suffix}" for suffix in ("csv", "md", "tex")]
    table.to_csv(paths[0], index=False, float_format="%.10g", lineterminator="\n")
    shown = _formatted(table)
    paths[1].write_text(_markdown(shown))
    paths[2].write_text(shown.to_latex(index=False, escape=True))
    return paths


def _markdown(frame: pd.DataFrame) -> str:
    """A GitHub table (pandas' own needs the optional tabulate package)."""
    cells = [[str(c) for c in frame.columns]] + [[str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + "|".join(" --- " for _ in frame.columns) + "|")
    return "\n".join(lines) + "\n"


# The flat results file that experiments/results/ keeps: one row per run, plain names.
RESULT_COLUMNS = {
    "device.name": "device",
    "model.name": "model",
    "model.weights": "weights",
    "setting": "setting",
    "mode": "mode",
    "bits": "bits",
    "max_length": "max_length",
    "force_length": "force_length",
    "repetitions": "repetitions",
    "memory/weights_gb": "weights_gb",
    "memory/peak_gb": "peak_memory_gb",
    "memory/peak_reserved_gb": "peak_reserved_gb",
    "time/decode_ms_per_token": "ms_per_token",
    "time/ttft_ms": "ttft_ms",
    "time/tokens_per_s": "tokens_per_s",
    "time/generate_s": "generate_s",
    "tokens/new_tokens_total": "new_tokens_total",
    "time/load_s": "load_s",
    "generation.fast": "fast",
    "roofline_fraction": "roofline_fraction",
    "quality/kl_mean": "kl_mean",
    "quality/top1_agreement": "top1_agreement",
    "quality/perplexity_en": "perplexity_en",
    "quality/perplexity_zh": "perplexity_zh",
    "run_id": "run_id",
}


def results(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run with the columns experiments/results/*.csv promise."""
    runs = ordered(runs.assign(**{"memory/peak_gb": peak_memory(runs)}))
    present = {k: v for k, v in RESULT_COLUMNS.items() if k in runs}
    return runs[list(present)].rename(columns=present).reset_index(drop=True)


def roofline(runs: pd.DataFrame) -> pd.DataFrame:
    """Eager against fast decoding, one row per run: `mode` is eager or fast here, `quant` the
    weights' mode (with LLM.int8's outlier threshold, which decides whether a graph can hold it);
    the floor's inputs, the path the fast decoder took and the commit that ran beside them."""
    runs = ordered(runs.assign(**{"memory/peak_gb": peak_memory(runs)}))
    fast = column(runs, "generation.fast", False).astype(str).str.lower() == "true"
    table = pd.DataFrame({
        "device": runs.get("device.name", runs.get("falcon_exp.device")),
        "model": runs["model.name"],
        "bits": runs["bits"],
        "mode": fast.map({True: "fast", False: "eager"}),
        "ms_per_token": runs["time/decode_ms_per_token"],
        "roofline_fraction": runs["roofline_fraction"],
        "peak_memory_gb": runs["memory/peak_gb"],
        "quant": runs["mode"],
        "int8_threshold": column(runs, "quantization.int8_threshold").where(runs["bits"] == 8),
        "new_tokens": column(runs, "max_new_tokens"),
        "floor_ms_per_token": runs["time/decode_ms_per_token"] * runs["roofline_fraction"],
        "copy_bandwidth_gbs": runs["roofline/copy_bandwidth_gbs"],
        "weight_bytes_per_step_gb": runs["roofline/weight_bytes_per_step_gb"],
        "decode_path": runs.get("falcon_exp.decode_path", "eager"),
        "fallback": column(runs, "falcon_exp.fast_fallback", "").fillna(""),
        "commit": column(runs, "git.commit", "").str[:7],
        "run_id": runs["run_id"],
    })
    return table.reset_index(drop=True)

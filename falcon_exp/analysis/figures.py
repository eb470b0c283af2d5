"""Figures in one style, each as PNG, PDF and SVG, byte-identical for the same runs: a fixed
font shipped with matplotlib, no dates or software versions in the files' metadata, a fixed SVG
hash salt, and rows in a stable order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib as mpl
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from falcon_exp import schema
from falcon_exp.analysis.load import MODE, SCHEME
from falcon_exp.analysis.tables import BACKEND, MODE_ORDER, REP_HIGH, REP_LOW, column, ordered, peak_memory, repetition_range, task_columns
from falcon_exp.cache import replaced

STYLE = {
    "font.family": "DejaVu Sans",
    "svg.hashsalt": "falcon-exp",
    "svg.fonttype": "path",
    "pdf.fonttype": 42,
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "axes.titlesize": 11,
}
METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
    "svg": {"Creator": None, "Date": None},
}
PEAK_LABEL = "peak memory GB (allocator over GPUs, else host RSS)"


def _figure(ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure of its own (no pyplot: no global backend or figure registry to touch)."""
    figure = Figure(**kwargs)
    return figure, figure.subplots(1, ncols)


def _save(figure: Figure, directory: Path, stem: str) -> list[Path]:
    paths = []
    for suffix, metadata in METADATA.items():
        path = directory / f"{stem}.{suffix}"
        with replaced(path) as staging:  # whole or not at all, should the analysis be stopped
            figure.savefig(staging, format=suffix, metadata=metadata, bbox_inches="tight")
        paths.append(path)
    return paths


def _modes(frame: pd.DataFrame) -> list[str]:
    return sorted(frame[MODE].unique(), key=lambda m: (MODE_ORDER.get(m, 99), m))


def _backend_marker(keys: list[str]) -> str | None:
    """A marker per backend where the runs span backends (`varying` chose the key), else none."""
    return BACKEND if BACKEND in keys else None


def _label(runs: pd.DataFrame, keys: list[str]) -> pd.Series:
    """A configuration's name in legends: its mode and the other keys the sweep varied (for the
    unquantized baseline, none of the quantization settings, which do not apply to it), and
    `(noisy)` where generations a busy machine disturbed are still among its samples."""
    others = [k for k in keys if k not in (MODE, "bits", BACKEND)]  # the mode names its backend
    baseline = pd.to_numeric(column(runs, "bits"), errors="coerce") == 16
    noisy = column(runs, schema.NOISE_OFF, 0).fillna(0) > 0
    names = [", ".join([row[MODE]] + [f"{k.split('.')[-1]}={row[k]}" for k in others if not (unquantized and k.startswith("quantization."))])
             for (_, row), unquantized in zip(runs.iterrows(), baseline)]
    return pd.Series(names, index=runs.index) + noisy.map({True: " (noisy)", False: ""})


def memory_and_time_per_prompt(runs: pd.DataFrame, samples: pd.DataFrame, keys: list[str], directory: Path) -> list[Path]:
    """The article's figure redone: per prompt, peak memory and end-to-end time, one bar per
    mode (the median), error bars spanning the repetitions (min to max)."""
    data = samples.merge(runs[["run_id", MODE]].assign(config=_label(runs, keys)), on="run_id")
    data = data.assign(**{"peak GB": peak_memory(data, schema.SAMPLE), "prompt": data["prompt_index"] + 1})
    figure, axes = _figure(2, figsize=(10, 3.8))
    order = list(dict.fromkeys(_label(ordered(runs), keys)))
    for axis, key, title in ((axes[0], "peak GB", PEAK_LABEL), (axes[1], schema.sample(schema.GENERATE_S), "generate s (per prompt)")):
        sns.barplot(data=data, x="prompt", y=key, hue="config", hue_order=order, estimator="median",
                    errorbar=("pi", 100), ax=axis, capsize=0.1, err_kws={"linewidth": 1})
        axis.set_title(title)
        axis.set_ylabel(key.split("/")[-1])
    axes[0].get_legend().remove()
    sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1, 1), title=None)
    figure.suptitle("Memory and time per prompt (median; bars: min to max over repetitions)")
    return _save(figure, directory, "memory_time_per_prompt")


def tradeoff(runs: pd.DataFrame, samples: pd.DataFrame, keys: list[str], directory: Path) -> list[Path]:
    """Peak memory against decode time per token: one point per configuration, its bar the range
    of the repetitions' medians (a time, never below zero)."""
    decode = schema.DECODE_MS_PER_TOKEN
    runs = ordered(runs).assign(config=lambda r: _label(r, keys), peak=lambda r: peak_memory(r))
    spread = runs[["run_id"]].join(repetition_range(samples, decode), on="run_id")
    below = (runs[decode] - spread[REP_LOW]).clip(lower=0).fillna(0)
    above = (spread[REP_HIGH] - runs[decode]).clip(lower=0).fillna(0)
    figure, axis = _figure(figsize=(6, 4.2))
    sns.scatterplot(data=runs, x="peak", y=decode, hue=MODE, hue_order=_modes(runs), style=_backend_marker(keys), s=70, ax=axis)
    axis.errorbar(runs["peak"], runs[decode], yerr=[below.to_numpy(), above.to_numpy()], fmt="none", ecolor="grey", elinewidth=1, capsize=3)
    for _, row in runs.iterrows():
        axis.annotate(row["config"], (row["peak"], row[decode]), textcoords="offset points", xytext=(6, 4), fontsize=7)
    axis.set_xlabel(PEAK_LABEL)
    axis.set_ylabel("decode ms/token (median; bar: range of\nthe repetitions' medians)")
    axis.set_title("Memory against speed")
    return _save(figure, directory, "tradeoff")


def latency_per_prompt(runs: pd.DataFrame, samples: pd.DataFrame, keys: list[str], directory: Path) -> list[Path]:
    """Decode time per token for each prompt, error bars across repetitions (min to max)."""
    data = samples.merge(runs[["run_id"]].assign(config=_label(runs, keys)), on="run_id")
    data = data.assign(prompt=data["prompt_index"] + 1)
    order = list(dict.fromkeys(_label(ordered(runs), keys)))
    figure, axis = _figure(figsize=(7, 4))
    sns.pointplot(data=data, x="prompt", y=schema.sample(schema.DECODE_MS_PER_TOKEN), hue="config", hue_order=order,
                  estimator="median", errorbar=("pi", 100), dodge=0.3 if len(order) > 1 else False, capsize=0.1,
                  linestyle="none", ax=axis)  # seaborn divides by (configurations - 1) to dodge
    axis.set_ylabel("decode ms/token")
    axis.set_title("Per-prompt decode latency (median; bars: min to max over repetitions)")
    sns.move_legend(axis, "upper left", bbox_to_anchor=(1, 1), title=None)
    return _save(figure, directory, "latency_per_prompt")


def time_vs_max_length(runs: pd.DataFrame, samples: pd.DataFrame, directory: Path) -> list[Path]:
    """End-to-end time per prompt against max_length, a line per mode."""
    data = samples.merge(runs[["run_id", MODE, "max_length"]], on="run_id")
    figure, axis = _figure(figsize=(6, 4))
    sns.lineplot(data=data, x="max_length", y=schema.sample(schema.GENERATE_S), hue=MODE, hue_order=_modes(runs),
                 marker="o", estimator="median", errorbar=("pi", 50), ax=axis)
    axis.set_ylabel("generate s per prompt (median; band: IQR over prompts x repetitions)")
    axis.set_title("Time against max_length")
    return _save(figure, directory, "time_vs_max_length")


def quality_vs_memory(runs: pd.DataFrame, keys: list[str], metric: str, directory: Path, stem: str = "quality_vs_memory") -> list[Path]:
    """A quality metric against weights and against decode time: a point per configuration, with
    its standard error as bars where the run logged one (cut at zero: none of these quantities is
    negative); the title says which metric, and on which corpus."""
    runs = ordered(runs).assign(config=lambda r: _label(r, keys))
    error = column(runs, schema.stderr_of(metric))
    figure, axes = _figure(2, figsize=(11, 4.2))
    for axis, x, label in ((axes[0], schema.WEIGHTS_GB, "weights GB"), (axes[1], schema.DECODE_MS_PER_TOKEN, "decode ms/token (median)")):
        sns.scatterplot(data=runs, x=x, y=metric, hue=MODE, hue_order=_modes(runs), style=_backend_marker(keys), s=70, ax=axis)
        if error.notna().any():
            below = error.fillna(0).clip(upper=runs[metric].clip(lower=0))
            axis.errorbar(runs[x], runs[metric], yerr=[below.to_numpy(), error.fillna(0).to_numpy()], fmt="none", ecolor="grey",
                          elinewidth=1, capsize=3)
        for _, row in runs.iterrows():
            axis.annotate(row["config"], (row[x], row[metric]), textcoords="offset points", xytext=(6, 4), fontsize=7)
        axis.set_xlabel(label)
        axis.set_ylabel(metric + (" (bars: ± standard error)" if error.notna().any() else ""))
    axes[1].get_legend().remove()
    corpus = sorted({Path(str(p)).name for p in column(runs, "quality.corpus", None).dropna() if str(p) != "None"})
    on = f" on {', '.join(corpus)}" if metric in schema.CORPUS and corpus else ""
    figure.suptitle(f"Quality against memory and speed: {metric}{on}")
    return _save(figure, directory, stem)


def against_batch(runs: pd.DataFrame, keys: list[str], metric: str, label: str, directory: Path, stem: str) -> list[Path]:
    """A metric against batch_size, a line per configuration (the keys the sweep varied but the
    batch), with the smallest batch at which each quantized mode falls behind the unquantized
    baseline marked (on aggregate tokens/s: below it; on joules per token: above it)."""
    runs = ordered(runs).assign(config=lambda r: _label(r, [k for k in keys if k != "batch_size"]))
    figure, axis = _figure(figsize=(7, 4.2))
    sns.lineplot(data=runs, x="batch_size", y=metric, hue="config", marker="o", estimator=None, sort=True, ax=axis)
    baseline = runs[runs[SCHEME] == "none"].set_index("batch_size")[metric] if (runs[SCHEME] == "none").any() else None
    if baseline is not None and baseline.index.is_unique:
        worse = (lambda value, base: value < base) if metric == schema.AGGREGATE_TOKENS_PER_S else (lambda value, base: value > base)
        for _, line in runs[runs[SCHEME] != "none"].groupby("config"):
            behind = [r for _, r in line.sort_values("batch_size").iterrows()
                      if r["batch_size"] in baseline.index and worse(r[metric], baseline[r["batch_size"]])]
            if behind:
                axis.scatter([behind[0]["batch_size"]], [behind[0][metric]], s=160, facecolors="none", edgecolors="black", zorder=5)
    axis.set_xscale("log", base=2)
    axis.set_xticks(sorted(runs["batch_size"].unique()))
    axis.xaxis.set_major_formatter(mpl.ticker.ScalarFormatter())
    axis.set_xlabel("batch_size (sequences decoded together)")
    axis.set_ylabel(label)
    axis.set_title(f"{label} against batch size (circled: where a mode first falls behind {_baseline_name(runs)})")
    sns.move_legend(axis, "upper left", bbox_to_anchor=(1, 1), title=None)
    return _save(figure, directory, stem)


def _baseline_name(runs: pd.DataFrame) -> str:
    names = sorted(runs.loc[runs[SCHEME] == "none", MODE].unique())
    return ", ".join(names) or "the unquantized baseline"


QUALITY_METRICS = (schema.CORPUS_KL_MEAN, schema.KL_MEAN, schema.perplexity_ratio("en"))  # the first the runs logged


def make_all(runs: pd.DataFrame, samples: pd.DataFrame, keys: list[str], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    with mpl.rc_context(STYLE), sns.axes_style("whitegrid"):
        sns.set_palette("colorblind")
        paths += memory_and_time_per_prompt(runs, samples, keys, directory)
        paths += tradeoff(runs, samples, keys, directory)
        paths += latency_per_prompt(runs, samples, keys, directory)
        if "max_length" in runs and runs["max_length"].nunique() > 1:
            paths += time_vs_max_length(runs, samples, directory)
        if "batch_size" in runs and runs["batch_size"].nunique() > 1:
            paths += against_batch(runs, keys, schema.AGGREGATE_TOKENS_PER_S, "aggregate decode tokens/s", directory, "throughput_vs_batch")
            if schema.JOULES_PER_TOKEN in runs and runs[schema.JOULES_PER_TOKEN].notna().any():
                paths += against_batch(runs, keys, schema.JOULES_PER_TOKEN, "joules per token", directory, "energy_vs_batch")
        for metric in QUALITY_METRICS:
            if metric in runs and runs[metric].notna().any():
                paths += quality_vs_memory(runs, keys, metric, directory)
                break
        if tasks := task_columns(runs):  # lm-eval's: the first task's first metric
            paths += quality_vs_memory(runs, keys, tasks[0], directory, "task_vs_memory")
    return paths

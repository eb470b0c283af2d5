"""Records -> MLflow. The only module that writes to MLflow.

A sweep (`-m`) is a parent run with one child run per Hydra job; a single job is a plain run.
Params are the flattened config; metrics are grouped by prefix (time/, memory/, tokens/,
quality/, roofline/) with their unit in the name, beside `roofline_fraction`; aggregates carry
the median under the plain name and the spread under `.p25`, `.p75`, `.std`, `.mean`, `.min`,
`.max`; each sample (prompt x repetition) is logged under `sample/<name>` at step `prompt_index * repetitions + repetition`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from falcon_exp.config import FalconExpError, JobConfig
from falcon_exp.measure import summarize
from falcon_exp.runner import JobResult

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
# A tracking server that goes away should fail a job in seconds, not after MLflow's default
# minutes of retries; a user's own settings win.
for _key, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                     ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
    os.environ.setdefault(_key, _value)
PARENT_RUN_FILE = "mlflow_parent_run_id"
TIMING_METRICS = ("generate_s", "ttft_ms", "decode_ms_per_token", "tokens_per_s")
TOKEN_METRICS = ("prompt_tokens", "new_tokens")
SPREAD = ("p25", "p75", "std", "mean", "min", "max")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def check_store(timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming the URI, when the store cannot be reached or written."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                response.read()
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise FalconExpError(f"the MLflow tracking server {uri} is unreachable ({reason})") from None
        return
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise FalconExpError(f"the MLflow store {uri} cannot be created ({error.strerror})") from None
        if not os.access(database.parent, os.W_OK) or (database.exists() and not os.access(database, os.W_OK)):
            raise FalconExpError(f"the MLflow store {uri} is not writable")
    try:
        _client().search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here means: no usable store
        raise FalconExpError(f"the MLflow store {uri} cannot be used: {str(error).splitlines()[0]}") from None


def experiment_id(name: str) -> str:
    """The experiment's id, creating it (artifacts beside a SQLite store) on first use."""
    client = _client()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri = tracking_uri()
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - a parallel job created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


@contextlib.contextmanager
def job_run(
    job: JobConfig, name: str, tags: dict[str, str], config_yaml: str, parent_run_id: str | None, output_dir: str | None
) -> Iterator[str]:
    """One MLflow run around a job: FINISHED on success, FAILED with the error attached on an
    exception, KILLED on Ctrl-C. Yields the run id."""
    from mlflow.entities import Param, RunTag

    client = _client()
    run_tags = dict(tags) | {"falcon_exp.config_hash": job.identity}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(job.experiment), run_name=name, tags=run_tags)
    run_id = run.info.run_id
    params = [Param(k, _param_value(v)) for k, v in sorted(job.flat.items())] + [Param("mode", job.mode)]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    client.log_text(run_id, config_yaml, "config/config.yaml")
    client.log_text(run_id, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in job.prompts.items), "config/prompts.jsonl")
    if output_dir and (Path(output_dir) / ".hydra").is_dir():
        client.log_artifacts(run_id, str(Path(output_dir) / ".hydra"), "hydra")
    try:
        yield run_id
    except KeyboardInterrupt:
        client.set_tag(run_id, "falcon_exp.error", "KeyboardInterrupt: stopped by the user")
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException as error:
        client.log_batch(run_id, tags=[RunTag("falcon_exp.error", one_line(error))])
        client.log_text(run_id, "".join(traceback.format_exception(error)), "error.txt")
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def finished_run(job: JobConfig) -> str | None:
    """The id of a FINISHED run of exactly this configuration, if the store has one."""
    found = _client().search_runs(
        [experiment_id(job.experiment)],
        filter_string=f"tags.falcon_exp.config_hash = '{job.identity}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def end_run(run_id: str, status: str) -> None:
    _client().set_terminated(run_id, status)


def _param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def log_result(run_id: str, job: JobConfig, result: JobResult) -> None:
    """Metrics, tags and generated texts of a finished job."""
    from mlflow.entities import Metric, RunTag

    client = _client()
    now = int(time.time() * 1000)
    reps = job.generation.repetitions
    metrics: list[Metric] = []
    columns = {f"time/{n}": [getattr(s.timing, n) for s in result.samples] for n in TIMING_METRICS}
    columns |= {f"tokens/{n}": [getattr(s.timing, n) for s in result.samples] for n in TOKEN_METRICS}
    columns |= {f"memory/{k}": [s.memory[k] for s in result.samples] for k in result.samples[0].memory}
    columns["roofline_fraction"] = [s.roofline_fraction for s in result.samples]
    steps = [sample.prompt_index * reps + sample.repetition for sample in result.samples]
    for key, values in columns.items():
        metrics += [Metric(f"sample/{key}", float(v), now, step) for v, step in zip(values, steps)]
        if key.startswith("tokens/"):
            metrics.append(Metric(f"{key}_total", float(sum(values)), now, 0))
        elif not key.startswith("memory/"):  # memory's run-level figures are peaks, logged below
            stats = summarize([float(v) for v in values])
            if stats:
                metrics.append(Metric(key, stats["median"], now, 0))
                metrics += [Metric(f"{key}.{s}", stats[s], now, 0) for s in SPREAD]
    memory = {"memory/weights_gb": result.report.weights_bytes / 1e9} | {f"memory/{k}": v for k, v in result.memory.items()}
    metrics += [Metric(k, float(v), now, 0) for k, v in memory.items()]
    metrics += [
        Metric("quant/linear_layers", float(result.report.linear_layers), now, 0),
        Metric("quant/quantized_layers", float(result.report.quantized_layers), now, 0),
    ]
    if result.load_s is not None:
        metrics.append(Metric("time/load_s", result.load_s, now, 0))
    metrics += [Metric(k, float(v), now, 0) for k, v in (result.quality | result.roofline).items()]
    tags = {
        "falcon_exp.decode_path": result.decode_path,
        "falcon_exp.model_reused": str(result.load_s is None).lower(),
        "falcon_exp.quantization_realised": result.report.realised,
        "falcon_exp.device": result.device,
    }
    if result.fast_fallback:
        tags["falcon_exp.fast_fallback"] = result.fast_fallback
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    rows = [
        {"prompt_index": s.prompt_index, "repetition": s.repetition, "prompt": s.prompt, "output": s.output}
        | {n: getattr(s.timing, n) for n in TOKEN_METRICS + TIMING_METRICS}
        for s in result.samples
    ]
    client.log_text(run_id, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "generations.jsonl")
    client.log_table(run_id, {k: [r[k] for r in rows] for k in rows[0]}, "generations.json")


def start_sweep_run(experiment: str, name: str, sweep_dir: Path) -> str:
    """The parent run of a sweep; its id goes to a file in the sweep folder for every job, in
    this process or another (joblib, SLURM)."""
    client = _client()
    run = client.create_run(experiment_id(experiment), run_name=name, tags={"falcon_exp.sweep_dir": str(sweep_dir)})
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / PARENT_RUN_FILE).write_text(run.info.run_id)
    return run.info.run_id


def sweep_parent_run_id(sweep_dir: Path) -> str | None:
    path = sweep_dir / PARENT_RUN_FILE
    return path.read_text().strip() if path.is_file() else None


def end_sweep_run(parent_run_id: str) -> list:
    """Close the parent run: FAILED when any child did not finish. Returns the children."""
    client = _client()
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000
    )
    children.sort(key=lambda r: r.info.start_time)
    ok = children and all(c.info.status == "FINISHED" for c in children)
    client.set_terminated(parent_run_id, "FINISHED" if ok else "FAILED")
    return children


def print_summary(children: list) -> None:
    """A compact table of a sweep's runs, and the command that opens the UI."""
    names = [(run.info.run_name or run.info.run_id).split(",") for run in children]
    common = set.intersection(*map(set, names)) if names else set()
    header = f"{'mode':<6} {'job':<28} {'status':<9} {'weights_gb':>10} {'peak_gb':>8} {'ms/token':>9} {'tokens/s':>9}"
    lines = [header, "-" * len(header)]
    for run, name in zip(children, names):
        m = run.data.metrics
        peak = m.get("memory/peak_allocated_gb", m.get("memory/peak_rss_gb", float("nan")))
        job = ",".join(part for part in name if part not in common)[:28]
        lines.append(
            f"{run.data.params.get('mode', '?'):<6} {job:<28} {run.info.status:<9} "
            f"{m.get('memory/weights_gb', float('nan')):>10.3f} {peak:>8.3f} "
            f"{m.get('time/decode_ms_per_token', float('nan')):>9.1f} {m.get('time/tokens_per_s', float('nan')):>9.2f}"
        )
    lines.append("peak_gb: allocator peak summed over GPUs, or the process's peak resident memory on a CPU")
    uri = tracking_uri()
    lines.append(f"runs are in {uri}; compare them with: mlflow ui --backend-store-uri {uri}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def log_figures(run_id: str, paths: list[Path]) -> None:
    """Attach the analysis' files to a sweep's parent run."""
    client = _client()
    for path in paths:
        client.log_artifact(run_id, str(path), "analysis")

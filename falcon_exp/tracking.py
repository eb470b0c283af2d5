"""Records -> MLflow. The only module that writes to MLflow.

A sweep (`-m`) is a parent run with one child run per Hydra job; a single job is a plain run.
Params are the flattened config; metrics and tags are named in falcon_exp/schema.py, with their
units and meanings.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from falcon_exp import schema
from falcon_exp.console import stopped_by
from falcon_exp.environment import commit as environment_commit
from falcon_exp.records import JobResult, median, repetition_std
from falcon_exp.store import client as _client
from falcon_exp.store import redact, shown_uri, tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Run

    from falcon_exp.job import Job

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
    return redact(f"{type(error).__name__}: {text[0] if text else ''}")[:500]


def source_tags(tags: dict[str, str]) -> dict[str, str]:
    """The run's tags with MLflow's standard ones (source name and type, user, git commit) as
    MLflow resolves them, so the UI's Source and Version columns are filled; where MLflow finds
    no repository (an installed package) the commit falcon-exp knows is used."""
    from mlflow.tracking.context.registry import resolve_tags

    resolved = resolve_tags(tags)
    commit = tags.get(schema.TAG_GIT_COMMIT) or environment_commit()
    if commit and commit != "unknown" and "mlflow.source.git.commit" not in resolved:
        resolved["mlflow.source.git.commit"] = commit
    return resolved


@contextlib.contextmanager
def job_run(job: Job, name: str, tags: dict[str, str], config_yaml: str, parent_run_id: str | None, output_dir: str | None
            ) -> Iterator[str]:
    """One MLflow run around a job: FINISHED on success, FAILED with the error attached on an
    exception, KILLED when a signal stops it (from the moment the run exists). Yields the run id."""
    from mlflow.entities import Param, RunTag

    client = _client()
    run_tags = source_tags(dict(tags) | {schema.TAG_CONFIG_HASH: job.identity, schema.TAG_PROCESS: process_id()})
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(job.config.tracking.experiment), run_name=name, tags=run_tags)
    run_id = run.info.run_id
    try:
        params = [Param(k, _param_value(v)) for k, v in sorted(job.config.flat.items())]
        params += [Param("mode", job.config.mode), Param("scheme", job.config.scheme)]
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start : start + 100])
        client.log_text(run_id, config_yaml, "config/config.yaml")
        prompts = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in job.config.prompts.items)
        client.log_text(run_id, prompts, "config/prompts.jsonl")
        if output_dir and (Path(output_dir) / ".hydra").is_dir():
            client.log_artifacts(run_id, str(Path(output_dir) / ".hydra"), "hydra")
        yield run_id
    except KeyboardInterrupt as error:
        client.set_tag(run_id, schema.TAG_ERROR, f"stopped by {stopped_by(error)}")
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException as error:
        client.log_batch(run_id, tags=[RunTag(schema.TAG_ERROR, one_line(error))])
        client.log_text(run_id, redact("".join(traceback.format_exception(error))), "error.txt")
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def process_id() -> str:
    """`host:pid` of this process, so that a run it leaves RUNNING can be told from a live one."""
    return f"{socket.gethostname()}:{os.getpid()}"


def close_orphans(job: Job) -> list[str]:
    """Runs of exactly this configuration left RUNNING by a process that is gone (SIGKILL, a lost
    node): closed as FAILED with the reason, before `resume=true` runs the job again, so that no
    run is silently duplicated. A RUNNING run of a live process on this host is left alone.
    Returns what was closed, one line each."""
    client = _client()
    found = client.search_runs([experiment_id(job.config.tracking.experiment)],
                               filter_string=f"tags.{schema.TAG_CONFIG_HASH} = '{job.identity}' and attributes.status = 'RUNNING'")
    closed = _close_left_running(client, found, other_hosts=True)
    for run in closed:
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent and client.get_run(parent).info.status == "RUNNING":
            owner = run.data.tags.get(schema.TAG_PROCESS, "unknown")
            client.set_tag(parent, schema.TAG_ERROR, f"a job was left RUNNING by process {owner}; closed by resume=true")
            client.set_terminated(parent, "FAILED")
    return [f"{run.info.run_name} ({run.info.run_id})" for run in closed]


def close_orphan_sweeps(experiment: str) -> list[str]:
    """Sweeps' parent runs left RUNNING by a process of this host that is gone (it could not close
    them: killed, or the store was away at its end), and those of their jobs' runs still RUNNING
    whose process is gone too: closed as FAILED by `resume=true`, whichever part of the grid it
    runs again. Returns what was closed, one line each."""
    client = _client()
    found = client.search_runs([experiment_id(experiment)], max_results=10000,
                               filter_string=f"tags.{schema.TAG_SWEEP_DIR} LIKE '%' and attributes.status = 'RUNNING'")
    closed = _close_left_running(client, found, other_hosts=False)
    for parent in list(closed):
        closed += _close_left_running(client, _children(client, parent, running=True), other_hosts=True)
    return [f"{run.info.run_name} ({run.info.run_id})" for run in closed]


def _children(client: MlflowClient, parent: Run, running: bool = False) -> list[Run]:
    """A sweep's child runs (those still RUNNING only, if asked), in the order they started."""
    clause = f"tags.mlflow.parentRunId = '{parent.info.run_id}'" + (" and attributes.status = 'RUNNING'" if running else "")
    children = client.search_runs([parent.info.experiment_id], filter_string=clause, max_results=10000)
    return sorted(children, key=lambda r: r.info.start_time)


def _close_left_running(client: MlflowClient, runs: list[Run], other_hosts: bool) -> list[Run]:
    """Close as FAILED, saying why, those of `runs` whose process is gone; returns them."""
    closed = []
    for run in runs:
        owner = run.data.tags.get(schema.TAG_PROCESS, "unknown")
        if (where := _gone(owner, other_hosts)) is None:
            continue
        client.set_tag(run.info.run_id, schema.TAG_ERROR, f"left RUNNING by process {owner} ({where}); closed by resume=true")
        client.set_terminated(run.info.run_id, "FAILED")
        closed.append(run)
    return closed


def _gone(owner: str, other_hosts: bool) -> str | None:
    """Why the process `host:pid` counts as gone, or None where it may be alive: a live process on
    this host; on another host, unless `other_hosts` takes those as gone."""
    host, _, pid = owner.partition(":")
    if host == socket.gethostname():
        return None if pid.isdigit() and _alive(int(pid)) else "its process is gone"
    return "on another host, taken as gone since resume was asked" if other_hosts else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finished_run(job: Job) -> str | None:
    """The id of a FINISHED run of exactly this configuration, if the store has one."""
    found = _client().search_runs(
        [experiment_id(job.config.tracking.experiment)],
        filter_string=f"tags.falcon_exp.config_hash = '{job.identity}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def run_status(run_id: str) -> str | None:
    """A run's status, or None where the store has no such run."""
    try:
        return _client().get_run(run_id).info.status
    except Exception:  # noqa: BLE001 - MLflow raises its own error for an unknown id
        return None


def end_sweep_early(parent_run_id: str, status: str, why: str, wait_s: float = 10.0) -> None:
    """A sweep stopped before its end (KILLED by a signal, FAILED by an error of its own) ends so,
    and so do its jobs' runs left RUNNING by processes of this host that are gone once given
    `wait_s` to close their own (a parallel launcher's workers go with the process that started
    them). A job still running elsewhere (SLURM) closes its own run."""
    client = _client()
    parent = client.get_run(parent_run_id)
    deadline = time.monotonic() + wait_s
    for child in _children(client, parent, running=True):
        owner = child.data.tags.get(schema.TAG_PROCESS, "unknown")
        if owner.partition(":")[0] != socket.gethostname():
            continue
        while _gone(owner, other_hosts=False) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if _gone(owner, other_hosts=False) and client.get_run(child.info.run_id).info.status == "RUNNING":
            client.set_tag(child.info.run_id, schema.TAG_ERROR, f"{why}: its sweep was stopped")
            client.set_terminated(child.info.run_id, status)
    if parent.info.status == "RUNNING":
        client.set_tag(parent_run_id, schema.TAG_ERROR, why)
        client.set_terminated(parent_run_id, status)


def _param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _metrics_of(job: Job, result: JobResult) -> list[Metric]:
    """Every metric of a finished job: per sample at its step, and the run's figures."""
    from mlflow.entities import Metric

    now, reps = int(time.time() * 1000), job.config.repetitions
    points: list[Metric] = []

    def log(key: str, value: float, step: int = 0) -> None:
        points.append(Metric(key, float(value), now, step))

    per_sample = {schema.TTFT_MS: "ttft_ms", schema.DECODE_MS_PER_TOKEN: "decode_ms_per_token", schema.GENERATE_S: "generate_s",
                  schema.E2E_TOKENS_PER_S: "e2e_tokens_per_s", schema.PROMPT_TOKENS: "prompt_tokens", schema.NEW_TOKENS: "new_tokens"}
    columns = {key: [getattr(s.timing, field) for s in result.samples] for key, field in per_sample.items()}
    columns[schema.FLOOR_MS_PER_TOKEN] = [s.floor_ms_per_token for s in result.samples]
    columns[schema.ROOFLINE_FRACTION] = [s.roofline_fraction for s in result.samples]
    columns |= {key: [s.memory[key] for s in result.samples] for key in result.samples[0].memory}
    for key, values in columns.items():
        for sample, value in zip(result.samples, values):
            log(schema.sample(key), value, sample.prompt_index * reps + sample.repetition)
        if key in schema.TOKENS:
            log(schema.total(key), sum(values))
        elif key == schema.FLOOR_MS_PER_TOKEN and (middle := median(values)) is not None:
            log(key, middle)
        elif key in schema.TIMED and (middle := median(values)) is not None:
            log(key, middle)
            by_prompt: dict[int, list[float]] = {}
            for sample, value in zip(result.samples, values):
                by_prompt.setdefault(sample.prompt_index, []).append(value)
            if (spread := repetition_std(by_prompt)) is not None:
                log(key + schema.REP_STD, spread)
    decode_ms = median(columns[schema.DECODE_MS_PER_TOKEN])
    if decode_ms is not None:
        log(schema.DECODE_TOKENS_PER_S, 1000 / decode_ms)
    log(schema.WARMUP_TOKENS_TOTAL, result.warmup_tokens)
    for key, value in (result.memory | {schema.WEIGHTS_GB: result.report.weights_bytes / schema.GB}).items():
        log(key, value)  # memory's run-level figures are peaks over the generations
    log(schema.LINEAR_LAYERS, result.report.linear_layers)
    log(schema.QUANTIZED_LAYERS, result.report.quantized_layers)
    for key, value in result.int8_outliers.items():
        log(key, value)
    if result.load_s is not None:
        log(schema.LOAD_S, result.load_s)
    for key, value in result.quality.items():
        log(key, value)
    log(schema.READ_BANDWIDTH_GBS, result.bandwidth["read"] / 1e9)
    log(schema.COPY_BANDWIDTH_GBS, result.bandwidth["copy"] / 1e9)
    log(schema.WEIGHT_BYTES_PER_STEP_GB, result.weight_bytes_per_step / 1e9)
    log(schema.KV_BYTES_PER_TOKEN, result.kv_bytes_per_token)
    return points


def _tags_of(result: JobResult) -> dict[str, str]:
    tags = {
        schema.TAG_DECODE_PATH: result.decode_path,
        schema.TAG_MODEL_REUSED: str(result.load_s is None).lower(),
        schema.TAG_QUANTIZATION_REALISED: result.report.realised,
        schema.TAG_DEVICE: result.device,
    }
    if result.fast_fallback:
        tags[schema.TAG_FAST_FALLBACK] = result.fast_fallback
    if result.cpu_kernel:
        tags[schema.TAG_BNB_KERNEL] = result.cpu_kernel
    if result.unmeasured:
        tags[schema.TAG_UNMEASURED] = "; ".join(f"{k}: {why}" for k, why in sorted(result.unmeasured.items()))
    above = [s.roofline_fraction for s in result.samples if s.roofline_fraction > 1]
    if above:
        tags[schema.TAG_ROOFLINE_WARNING] = (
            f"{len(above)} of {len(result.samples)} samples decode faster than the bandwidth floor allows (up to "
            f"{max(above):.3f}): the floor's bytes or bandwidth are wrong for this run"
        )
    return tags


def log_result(run_id: str, job: Job, result: JobResult) -> None:
    """Metrics, tags and generated texts of a finished job."""
    from mlflow.entities import RunTag

    client = _client()
    metrics = _metrics_of(job, result)
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _tags_of(result).items()])
    fields = ("prompt_tokens", "new_tokens", "generate_s", "ttft_ms", "decode_ms_per_token", "e2e_tokens_per_s")
    rows = [
        {"prompt_index": s.prompt_index, "repetition": s.repetition, "prompt": s.prompt, "output": s.output}
        | {n: getattr(s.timing, n) for n in fields}
        for s in result.samples
    ]
    client.log_text(run_id, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "generations.jsonl")
    client.log_table(run_id, {k: [r[k] for r in rows] for k in rows[0]}, "generations.json")


def start_sweep_run(experiment: str, name: str, sweep_dir: Path, params: dict[str, str]) -> str:
    """The parent run of a sweep, with the overrides common to all its jobs as params."""
    client = _client()
    tags = source_tags({schema.TAG_SWEEP_DIR: str(sweep_dir), schema.TAG_PROCESS: process_id()})
    run = client.create_run(experiment_id(experiment), run_name=name, tags=tags)
    if params:
        from mlflow.entities import Param

        try:
            client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])
        except Exception:
            client.set_terminated(run.info.run_id, "FAILED")
            raise
    return run.info.run_id


def end_sweep_run(parent_run_id: str, failed: list[str], reused: list[str]) -> list[Run]:
    """Close a sweep once all its jobs have returned: a child still RUNNING is then left over by a
    job that could not close it (the store was away when it ended, or its process was killed) and
    ends FAILED with that reason; the parent is FINISHED only if no job failed (`failed`: one
    line per job that did not finish, from its outcome) and names the runs of earlier sweeps that
    stand for the jobs resume=true skipped (`reused`). Returns the children."""
    client = _client()
    for start in range(0, len(reused), schema.REUSED_RUNS_PER_TAG):  # an MLflow tag holds at most 8,000 characters
        key = schema.TAG_REUSED_RUNS + (f".{start // schema.REUSED_RUNS_PER_TAG}" if start else "")
        client.set_tag(parent_run_id, key, " ".join(reused[start : start + schema.REUSED_RUNS_PER_TAG]))
    parent = client.get_run(parent_run_id)
    for child in _children(client, parent, running=True):
        client.set_tag(child.info.run_id, schema.TAG_ERROR, "still RUNNING when its sweep ended: its job could not close it")
        client.set_terminated(child.info.run_id, "FAILED")
    children = _children(client, parent)
    if failed:
        client.set_tag(parent_run_id, schema.TAG_ERROR, (f"{len(failed)} jobs failed: " + "; ".join(failed))[:5000])
    ok = not failed and all(c.info.status == "FINISHED" for c in children)
    client.set_terminated(parent_run_id, "FINISHED" if ok else "FAILED")
    return children


def print_summary(children: list[Run]) -> None:
    """A table of a sweep's runs (names never cut), and the command that opens the UI."""
    nan = float("nan")
    names = [(run.info.run_name or run.info.run_id).split(",") for run in children]
    common = set.intersection(*map(set, names)) if names else set()
    jobs = [",".join(part for part in name if part not in common) or ",".join(name) for name in names]
    width = max([len("job"), *map(len, jobs)])
    modes = [run.data.params.get("mode", "?") for run in children]
    mode_width = max([6, *map(len, modes)])
    header = f"{'mode':<{mode_width}} {'job':<{width}} {'status':<9} {'weights_gb':>10} {'peak_gb':>8} {'ms/token':>9} {'decode tok/s':>12}"
    lines = [header, "-" * len(header)]
    for run, job, mode in zip(children, jobs, modes):
        m = run.data.metrics
        peak = m.get(schema.PEAK_ALLOCATED_GB, m.get(schema.PEAK_RSS_GB, nan))
        lines.append(
            f"{mode:<{mode_width}} {job:<{width}} {run.info.status:<9} "
            f"{m.get(schema.WEIGHTS_GB, nan):>10.3f} {peak:>8.3f} "
            f"{m.get(schema.DECODE_MS_PER_TOKEN, nan):>9.1f} {m.get(schema.DECODE_TOKENS_PER_S, nan):>12.2f}"
        )
    lines.append("peak_gb: allocator peak (a sum of per-GPU peaks), or the process's peak resident memory on a CPU")
    uri = shown_uri()
    lines.append(f"runs are in {uri}; compare them with: mlflow ui --backend-store-uri {uri}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def log_figures(run_id: str, paths: list[Path]) -> None:
    """Attach the analysis' files to a sweep's parent run."""
    client = _client()
    for path in paths:
        client.log_artifact(run_id, str(path), "analysis")

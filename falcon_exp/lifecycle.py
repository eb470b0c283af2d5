"""Runs from their start to a terminal state: a job's run (FINISHED, FAILED, KILLED), a sweep's
parent run and its end, and a sweep stopped early. The only module that opens and closes runs.

A sweep (`-m`) is a parent run with one child run per Hydra job; a single job is a plain run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from falcon_exp import schema
from falcon_exp.console import log, one_line, stopped_by
from falcon_exp.environment import commit as environment_commit
from falcon_exp.failures import status_after
from falcon_exp.store import client as _client
from falcon_exp.store import redact, tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

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


def source_tags(tags: dict[str, str]) -> dict[str, str]:
    """The run's tags with MLflow's standard ones (source name and type, user, git commit) as
    MLflow resolves them, so the UI's Source and Version columns are filled. A run carries one
    commit: the one falcon-exp knows (FALCON_EXP_GIT_COMMIT, else the checkout's HEAD) is the
    Version column's too, and MLflow's branch goes where it named another commit's."""
    from mlflow.tracking.context.registry import resolve_tags

    resolved = resolve_tags(tags)
    commit = tags.get(schema.TAG_GIT_COMMIT) or environment_commit()
    if resolved.get(schema.MLFLOW_GIT_COMMIT, commit) != commit:  # another repository's (sys.argv[0]'s), or where ours is unknown
        resolved.pop(schema.MLFLOW_GIT_BRANCH, None)
        resolved.pop(schema.MLFLOW_GIT_COMMIT)
    if commit and commit != "unknown":
        resolved[schema.MLFLOW_GIT_COMMIT] = commit
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
        params += [Param(schema.PARAM_MODE, job.config.mode), Param(schema.PARAM_SCHEME, job.config.scheme)]
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start : start + 100])
        client.log_text(run_id, config_yaml, "config/config.yaml")
        prompts = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in job.config.prompts.items)
        client.log_text(run_id, prompts, "config/prompts.jsonl")
        if output_dir and (Path(output_dir) / ".hydra").is_dir():
            client.log_artifacts(run_id, str(Path(output_dir) / ".hydra"), "hydra")
        yield run_id
    except BaseException as error:
        try:
            if isinstance(error, KeyboardInterrupt):
                client.set_tag(run_id, schema.TAG_ERROR, f"stopped by {stopped_by(error)}")
            else:
                client.log_batch(run_id, tags=[RunTag(schema.TAG_ERROR, one_line(error))])
                client.log_text(run_id, redact("".join(traceback.format_exception(error))), "error.txt")
            client.set_terminated(run_id, status_after(error))
        except Exception as closing:  # noqa: BLE001 - the store is away: what ended the job still ends it (resume closes the run)
            log.error(f"could not close run {run_id} in MLflow: {one_line(closing)}")
        raise
    client.set_terminated(run_id, "FINISHED")


def _param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def process_id() -> str:
    """`host:pid` of this process, so that a run it leaves RUNNING can be told from a live one."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run_status(run_id: str) -> str | None:
    """A run's status, or None where the store has no such run."""
    try:
        return _client().get_run(run_id).info.status
    except Exception:  # noqa: BLE001 - MLflow raises its own error for an unknown id
        return None


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
    for child in children(client, parent, running=True):
        client.set_tag(child.info.run_id, schema.TAG_ERROR, "still RUNNING when its sweep ended: its job could not close it")
        client.set_terminated(child.info.run_id, "FAILED")
    ended = children(client, parent)
    if failed:
        client.set_tag(parent_run_id, schema.TAG_ERROR, (f"{len(failed)} jobs failed: " + "; ".join(failed))[:5000])
    ok = not failed and all(c.info.status == "FINISHED" for c in ended)
    client.set_terminated(parent_run_id, "FINISHED" if ok else "FAILED")
    return ended


def end_sweep_early(parent_run_id: str, status: str, why: str, wait_s: float = 10.0) -> None:
    """A sweep stopped before its end (KILLED by a signal, FAILED by an error of its own) ends so,
    and so do its jobs' runs left RUNNING by processes of this host that are gone once given
    `wait_s` to close their own (a parallel launcher's workers go with the process that started
    them). A job still running elsewhere (SLURM) closes its own run."""
    client = _client()
    parent = client.get_run(parent_run_id)
    deadline = time.monotonic() + wait_s
    for child in children(client, parent, running=True):
        owner = child.data.tags.get(schema.TAG_PROCESS, "unknown")
        if owner.partition(":")[0] != socket.gethostname():
            continue
        while gone(owner, other_hosts=False) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if gone(owner, other_hosts=False) and client.get_run(child.info.run_id).info.status == "RUNNING":
            client.set_tag(child.info.run_id, schema.TAG_ERROR, f"{why}: its sweep was stopped")
            client.set_terminated(child.info.run_id, status)
    if parent.info.status == "RUNNING":
        client.set_tag(parent_run_id, schema.TAG_ERROR, why)
        client.set_terminated(parent_run_id, status)


def children(client: MlflowClient, parent: Run, running: bool = False) -> list[Run]:
    """A sweep's child runs (those still RUNNING only, if asked), in the order they started."""
    clause = f"tags.mlflow.parentRunId = '{parent.info.run_id}'" + (" and attributes.status = 'RUNNING'" if running else "")
    children = client.search_runs([parent.info.experiment_id], filter_string=clause, max_results=10000)
    return sorted(children, key=lambda r: r.info.start_time)


def gone(owner: str, other_hosts: bool) -> str | None:
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

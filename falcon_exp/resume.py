"""What `resume=true` finds: the FINISHED run of a job's exact configuration, which it skips, and
the runs that a process now gone left RUNNING (SIGKILL, a lost node), which it closes as FAILED."""

from __future__ import annotations

from typing import TYPE_CHECKING

from falcon_exp import schema
from falcon_exp.lifecycle import children, experiment_id, gone
from falcon_exp.store import client as _client

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from falcon_exp.job import Job


def finished_run(job: Job) -> str | None:
    """The id of a FINISHED run of exactly this configuration, if the store has one."""
    found = _client().search_runs(
        [experiment_id(job.config.tracking.experiment)],
        filter_string=f"tags.{schema.TAG_CONFIG_HASH} = '{job.identity}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


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
    whose process, on this host, is gone too: closed as FAILED by `resume=true`, whichever part of
    the grid it runs again (a job elsewhere, SLURM's, may still be running). Returns what was
    closed, one line each."""
    client = _client()
    found = client.search_runs([experiment_id(experiment)], max_results=10000,
                               filter_string=f"tags.{schema.TAG_SWEEP_DIR} LIKE '%' and attributes.status = 'RUNNING'")
    closed = _close_left_running(client, found, other_hosts=False)
    for parent in list(closed):
        closed += _close_left_running(client, children(client, parent, running=True), other_hosts=False)
    return [f"{run.info.run_name} ({run.info.run_id})" for run in closed]


def _close_left_running(client: MlflowClient, runs: list[Run], other_hosts: bool) -> list[Run]:
    """Close as FAILED, saying why, those of `runs` whose process is gone; returns them."""
    closed = []
    for run in runs:
        owner = run.data.tags.get(schema.TAG_PROCESS, "unknown")
        if (where := gone(owner, other_hosts)) is None:
            continue
        client.set_tag(run.info.run_id, schema.TAG_ERROR, f"left RUNNING by process {owner} ({where}); closed by resume=true")
        client.set_terminated(run.info.run_id, "FAILED")
        closed.append(run)
    return closed

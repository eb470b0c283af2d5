"""A real SLURM cluster (one node, tests/cluster.py) writing to the PostgreSQL-backed tracking
server the other tests share: sweeps submitted through Hydra's submitit_slurm launcher, a job
cancelled with `scancel` mid-run and one stopped by its time limit, and `resume=true` re-running
exactly those jobs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import pytest

from conftest import QUICK, runs_of
from falcon_exp.cache import file_lock
from falcon_exp.roofline import BANDWIDTH_FILE
from falcon_exp.sweep import SWEEP_FILE

pytestmark = pytest.mark.slow
# A sweep's jobs submitted to the one-node cluster, a CPU and 2 GB each.
ON_THE_CLUSTER = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1",
                  "hydra.launcher.mem_gb=2"]


def test_a_slurm_sweep_a_cancelled_job_ends_killed_and_resume_reruns_exactly_it(tmp_path, pg_server, two_prompts, slurm,
                                                                               time_limited_sweep):  # its minute passes meanwhile
    store, _ = pg_server
    launcher = [*ON_THE_CLUSTER, "hydra.launcher.timeout_min=10", f"hydra.launcher.submitit_folder={tmp_path}/submitit"]
    job = [a for a in QUICK if not a.startswith(("max_new_tokens", "repetitions", "warmup"))]
    command = [sys.executable, "-m", "falcon_exp", "-m", *launcher, "bits=4,8", *job, "max_new_tokens=24", "repetitions=10", "warmup=0",
               f"prompts.file={two_prompts}", "tracking.experiment=slurm"]
    env = os.environ | slurm | {"MLFLOW_TRACKING_URI": store}
    sweep = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        deadline, target, under_way = time.monotonic() + 180, None, False
        while not under_way and time.monotonic() < deadline:  # the int8 job's second timed generation has ended
            time.sleep(0.2)
            if target is None and any(tmp_path.rglob(SWEEP_FILE)):  # written after the store and the parent run exist
                running = [r for r in runs_of(store, "slurm")[0] if r.data.params.get("bits") == "8" and r.info.status == "RUNNING"]
                target = running[0].data.tags["slurm.job_id"] if running else None
            log = tmp_path / "submitit" / f"{target}_0_log.err"
            under_way = target is not None and log.exists() and "prompt 1/2 rep 2/10" in log.read_text()
        assert under_way, "the int8 job never got under way on the cluster"
        subprocess.run(["scancel", target], check=True, env=env)
        _, err = sweep.communicate(timeout=300)
    finally:
        sweep.kill()
    assert sweep.returncode == 1 and "1 of 2 jobs failed" in err and "Traceback" not in err
    runs, _ = runs_of(store, "slurm")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.data.params["bits"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert parent.info.status == "FAILED"
    assert children["4"].info.status == "FINISHED" and children["4"].data.tags["slurm.job_id"].endswith("_0")
    assert children["8"].info.status == "KILLED" and children["8"].data.tags["falcon_exp.error"] == "stopped by SIGTERM"
    # the same sweep again with resume=true: only the cancelled job runs
    again = subprocess.run([*command, "resume=true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    runs, _ = runs_of(store, "slurm")
    second = [r for r in runs if r.data.tags.get("mlflow.parentRunId") not in (None, parent.info.run_id)]
    assert [(r.data.params["bits"], r.info.status) for r in second] == [("8", "FINISHED")]
    assert all(r.info.status != "RUNNING" for r in runs)



@pytest.fixture(scope="module")
def time_limited_sweep(tmp_path_factory, pg_server, slurm):
    """A one-job sweep with a two-minute SLURM limit, started before the other test of this module
    so that its minutes pass beside that test. SLURM's limit reaches a submitit job first as SIGUSR2
    (hydra.launcher.signal_delay_s before the limit, here 60 s; SLURM may send it up to a minute
    early, so at 0-60 s from the start with 120 s it came ~20 s in, while a busy machine's job was
    still importing torch); submitit then ends the job. The job waits for the machine's bandwidth
    measurement (its cache lock, held here) until then: a job past its limit without the CPUs."""
    root = tmp_path_factory.mktemp("time-limit")
    store, _ = pg_server
    command = [sys.executable, "-m", "falcon_exp", "-m", *ON_THE_CLUSTER, f"hydra.launcher.submitit_folder={root}/submitit",
               "bits=16", *QUICK, "tracking.experiment=slurm-time-limit"]
    env = os.environ | slurm | {"MLFLOW_TRACKING_URI": store, "FALCON_EXP_CACHE": str(root / "cache")}
    (root / "cache").mkdir()
    lock = contextlib.ExitStack()
    lock.enter_context(file_lock(root / "cache" / f".{BANDWIDTH_FILE}.lock"))
    limit = ["hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=60"]
    sweep = subprocess.Popen([*command, *limit], cwd=root, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)

    def ended() -> tuple[int, str]:
        """The sweep's exit code and stderr once it ends; the lock is let go then."""
        _, err = sweep.communicate(timeout=240)
        lock.close()
        return sweep.returncode, err

    try:
        yield ended, command, root, env
    finally:
        sweep.kill()
        lock.close()


def test_a_job_past_its_slurm_time_limit_ends_killed_and_resume_reruns_it(time_limited_sweep, pg_server):
    ended, command, root, env = time_limited_sweep
    code, err = ended()
    assert code == 1 and "1 of 1 jobs failed" in err and "Traceback" not in err
    (run,) = [r for r in runs_of(pg_server[0], "slurm-time-limit")[0] if "mlflow.parentRunId" in r.data.tags]
    assert run.info.status == "KILLED"
    assert run.data.tags["falcon_exp.error"] == "stopped by SLURM's time limit (SIGUSR2 from submitit)"
    again = subprocess.run([*command, "hydra.launcher.timeout_min=10", "resume=true"], cwd=root, env=env, capture_output=True,
                           text=True, timeout=150)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = [r for r in runs_of(pg_server[0], "slurm-time-limit")[0] if "mlflow.parentRunId" in r.data.tags]
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]

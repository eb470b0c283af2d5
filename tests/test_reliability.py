"""Fault injection: a sweep stopped with Ctrl-C, a re-run that resumes, a tracking server that
goes away mid-sweep and comes back, and no secret in the store."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from conftest import QUICK, run_cli, runs_of, start_cli, start_mlflow_server

pytestmark = pytest.mark.slow


LONG = [a for a in QUICK if not a.startswith(("max_new_tokens", "repetitions", "warmup"))] + ["warmup=0", "max_new_tokens=64",
                                                                                             "repetitions=50"]


def start_and_stop(tmp_path, *signals: signal.Signals, args: tuple[str, ...] = ("-m", "bits=4,8", *LONG),
                   under_way: str = "prompt 1/5 rep 1/50", group: bool = False, times: int = 1) -> tuple[int, str]:
    """Start a long job, wait until timed generation is under way (`times` lines saying so: one
    per parallel worker), send the signals (to its whole process group, as a terminal's Ctrl-C
    does, if `group`); returns the exit code and what it printed after them."""
    process = start_cli(*args, cwd=tmp_path, new_session=group)
    seen = 0
    for line in process.stderr:
        seen += under_way in line
        if seen == times:
            break
    for each in signals:
        os.killpg(process.pid, each) if group else process.send_signal(each)
        time.sleep(0.05)
    _, rest = process.communicate(timeout=120)
    return process.returncode, rest


JOBLIB = ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")


@pytest.mark.parametrize("args, signals, group, killed", [  # killed: the runs, a sweep's first
    (("bits=4", *LONG), (signal.SIGINT,), False, 1),
    (("-m", "bits=4,8", *LONG), (signal.SIGTERM, signal.SIGINT, signal.SIGTERM), False, 2),  # the sweep and the job it reached
    (("-m", *JOBLIB, "bits=4,8", *LONG), (signal.SIGTERM,), False, 3),  # the sweep and both workers' jobs
    (("-m", *JOBLIB, "bits=4,8", *LONG), (signal.SIGINT,), True, 3),
], ids=["ctrl-c, one job", "sigterm, then more during shutdown", "sigterm to a parallel sweep's main process",
        "ctrl-c to a parallel sweep's process group"])
def test_a_signal_ends_the_runs_and_their_sweep_killed_in_one_line(tmp_path, store, args, signals, group, killed):
    """Ctrl-C, SLURM's SIGTERM (time limit, pre-emption), SIGHUP; more signals while stopping
    wait for the runs to close rather than leave them RUNNING; a parallel sweep's workers go with
    it, and their runs end KILLED too."""
    code, rest = start_and_stop(tmp_path, *signals, args=args, group=group, times=2 if JOBLIB[0] in args else 1)  # both workers timing
    assert code == 128 + signals[0].value
    assert "Traceback" not in rest
    what = "the running job and its sweep are" if "-m" in args else "the running job is"
    assert f"falcon-exp: stopped by {signals[0].name}; {what} KILLED in MLflow (resume=true re-runs what did not finish)" in rest
    runs, _ = runs_of(store)
    assert [r.info.status for r in runs] == ["KILLED"] * killed
    for run in runs[1:]:
        assert run.data.tags["mlflow.parentRunId"] == runs[0].info.run_id
        assert run.data.tags["falcon_exp.error"].startswith(f"stopped by {signals[0].name}")


def test_sighup_stops_like_sigterm_and_more_signals_then_wait():
    """SIGHUP (a closed terminal) takes SIGTERM's path, whose end to end test is above: a real
    signal to this process."""
    from falcon_exp.console import STOP_SIGNALS, Stopped, stop_on_signals

    before = {each: signal.getsignal(each) for each in STOP_SIGNALS}
    try:
        stop_on_signals()
        with pytest.raises(Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(1)
        assert stopped.value.name == "SIGHUP"
        os.kill(os.getpid(), signal.SIGTERM)  # while stopping: said, not raised
    finally:
        for each, handler in before.items():
            signal.signal(each, handler)


def test_a_run_left_running_by_a_killed_process_is_closed_by_resume_and_run_again(tmp_path, store, two_prompts):
    """SIGKILL leaves no chance to close anything: the next `resume=true` finds the run RUNNING
    with a process that is gone, closes it as FAILED saying so, and runs the job again."""
    args = ("bits=4", *[a for a in LONG if not a.startswith(("repetitions", "max_new_tokens"))], "repetitions=3", "max_new_tokens=16",
            f"prompts.file={two_prompts}")
    code, _ = start_and_stop(tmp_path, signal.SIGKILL, args=args, under_way="prompt 1/2 rep 1/3")
    assert code == -signal.SIGKILL
    (orphan,), _ = runs_of(store)
    assert orphan.info.status == "RUNNING"
    done = run_cli(*args, "resume=true", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "it was left RUNNING by a process that is gone" in done.stderr
    runs, _ = runs_of(store)
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    assert "left RUNNING by process" in runs[0].data.tags["falcon_exp.error"]


def test_resume_over_part_of_a_killed_sweeps_grid_closes_what_it_left_and_is_analysed_whole(tmp_path, store, two_prompts,
                                                                                             monkeypatch, capsys):
    """SIGKILL during bits=8 of `-m bits=4,8`; `-m bits=4 resume=true` closes the dead sweep and
    its dead bits=8 run, skips bits=4, and its analysis shows bits=4 through the earlier run."""
    from falcon_exp.analysis.__main__ import main as analysis_main

    args = (*[a for a in LONG if not a.startswith(("repetitions", "max_new_tokens"))], "repetitions=3", "max_new_tokens=16",
            f"prompts.file={two_prompts}")
    code, _ = start_and_stop(tmp_path, signal.SIGKILL, args=("-m", "bits=4,8", *args), under_way="synthetic weights) as int8")
    assert code == -signal.SIGKILL
    again = run_cli("-m", "bits=4", *args, "resume=true", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    runs, _ = runs_of(store)
    assert [(r.info.run_name.split(" ")[:2], r.info.status) for r in runs] == [
        (["sweep", "bits=4,8"], "FAILED"), (["bits=4"], "FINISHED"), (["bits=8"], "FAILED"), (["sweep", "bits=4"], "FINISHED")]
    assert "closed by resume=true" in runs[2].data.tags["falcon_exp.error"]
    monkeypatch.chdir(tmp_path)
    assert analysis_main(["--out", str(tmp_path / "figures")]) == 0
    said = capsys.readouterr().out
    assert "read 1 runs of sweep 'sweep bits=4" in said and "1 of them from earlier sweeps, standing for the jobs resume=true skipped" in said
    assert (tmp_path / "figures" / "results.csv").read_text().count(runs[1].info.run_id) == 1


def test_a_read_only_folder_is_one_line_naming_where_to_write(read_only, tmp_path):
    """Hydra writes each job's files under the current folder: a read-only one is said before any run opens."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for args, key in ((QUICK, "hydra.run.dir"), (("-m", "bits=4", *QUICK), "hydra.sweep.dir")):
        done = run_cli(*args, cwd=read_only, env={"MLFLOW_TRACKING_URI": uri})
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
        assert lines[0].startswith(f"falcon-exp: error: {key}=") and "(Read-only file system); run falcon-exp from a writable folder" in lines[0]
    assert not (tmp_path / "mlflow.db").exists() or runs_of(uri)[0] == []


def test_a_full_disk_ends_in_one_line_per_failure_and_resume_closes_what_it_left(full_disk, two_prompts, monkeypatch):
    """The store and the job folders on a disk that fills up mid-sweep: no traceback, whoever
    meets the full disk (MLflow, SQLAlchemy, logging, Hydra); once there is room, resume leaves
    nothing RUNNING."""
    from mlflow import MlflowClient

    from falcon_exp import resume

    folder, fill = full_disk
    uri = f"sqlite:///{folder}/mlflow.db"
    MlflowClient(uri).search_experiments()  # the store, before the disk fills
    fill(100)
    args = ("-m", "bits=4,8", *QUICK, f"prompts.file={two_prompts}")
    done = run_cli(*args, cwd=folder, env={"MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Logging error" not in done.stderr, done.stderr[-3000:]
    assert "database or disk is full" in done.stderr or "No space left on device" in done.stderr
    (folder / "filler").unlink()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    resume.close_orphan_sweeps("falcon-exp")  # what the next resume=true does first
    runs, _ = runs_of(uri)
    assert runs and all(r.info.status != "RUNNING" for r in runs)


def test_two_sweeps_started_together_keep_their_own_folders_and_runs_and_log_no_secret(tmp_path, two_prompts):
    """Two sweeps start at once on a store that does not exist yet (its creation is serialised),
    each in its own folder with its own runs; no secret from the environment is stored anywhere."""
    secret = "hf_do_not_log_this_0123456789"
    env = os.environ | {"HF_TOKEN": secret, "MLFLOW_TRACKING_TOKEN": secret, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    sweeps = [start_cli("-m", "bits=4", *QUICK, f"prompts.file={two_prompts}", cwd=tmp_path, env=env) for _ in range(2)]
    for sweep in sweeps:
        _, err = sweep.communicate(timeout=300)
        assert sweep.returncode == 0, err[-2000:]
    runs, _ = runs_of(env["MLFLOW_TRACKING_URI"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and len({p.data.tags["falcon_exp.sweep_dir"] for p in parents}) == 2
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert [c.data.params["bits"] for c in children] == ["4"]
        assert {Path(c.data.tags["falcon_exp.output_dir"]).parent.name for c in children} == {Path(parent.data.tags["falcon_exp.sweep_dir"]).name}
    assert all(r.info.status == "FINISHED" for r in runs)
    files = [tmp_path / "mlflow.db", *(p for p in (tmp_path / "artifacts").rglob("*") if p.is_file())]
    assert len(files) > 10
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


def test_a_server_restarted_mid_sweep_fails_the_jobs_it_missed_and_resume_finishes_them(tmp_path, two_prompts, postgres):
    """The tracking server (on PostgreSQL) stops after the first job and comes back after the next
    job has failed: the jobs that met it away fail in seconds with one line each, the sweep goes
    on, and `resume=true` runs exactly those; nothing is left RUNNING."""
    (tmp_path / "server").mkdir()
    server, uri = start_mlflow_server(tmp_path / "server", backend=postgres)
    port = int(uri.rsplit(":", 1)[1])
    command = ["-m", "bits=4,8", *QUICK, f"prompts.file={two_prompts}", "tracking.experiment=restart"]
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}  # a user's own limit wins over falcon-exp's 3
    sweep = start_cli(*command, cwd=tmp_path, env=env)
    failures, down = [], None
    try:
        for line in sweep.stderr:
            if down is None and " FINISHED in " in line:  # the first job is in the store: take the server away
                server.terminate()
                server.wait(timeout=30)
                down = time.monotonic()
            elif " FAILED: " in line:
                failures.append((line.strip(), time.monotonic() - down))
                if len(failures) == 1:  # bring it back, on the same store
                    server, _ = start_mlflow_server(tmp_path / "server", port, backend=postgres)
            elif "Traceback" in line:
                raise AssertionError(line)
        sweep.communicate(timeout=60)
        assert sweep.returncode == 1 and failures
        failed = {re.search(r"job bits=(\d+) FAILED", line).group(1) for line, _ in failures}
        assert failed == {"8"}
        for line, after_s in failures:
            assert after_s < 120 and ("unreachable" in line or "Connection" in line), line
        again = run_cli(*command, "resume=true", cwd=tmp_path, env=env, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        runs, _ = runs_of(uri, "restart")
        finished = [r.data.params["bits"] for r in runs if r.info.status == "FINISHED" and "mlflow.parentRunId" in r.data.tags]
        assert sorted(finished) == ["4", "8"]  # the first sweep's job, and resume's re-run of exactly the failed one
        assert "skipping bits=4" in again.stderr
        assert all(r.info.status != "RUNNING" for r in runs)
    finally:
        sweep.kill()
        server.terminate()
        server.wait(timeout=30)

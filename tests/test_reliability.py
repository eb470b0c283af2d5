"""Fault injection: a sweep stopped with Ctrl-C, a re-run that resumes, a tracking server that
goes away mid-sweep and comes back, and no secret in the store."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUICK, run_cli, runs_of, start_mlflow_server

pytestmark = pytest.mark.slow


LONG = [a for a in QUICK if not a.startswith(("max_new_tokens", "repetitions", "warmup"))] + ["warmup=0", "max_new_tokens=64",
                                                                                             "repetitions=50"]


def start_and_stop(tmp_path, *signals: signal.Signals, args: tuple[str, ...] = ("-m", "bits=4,8", *LONG),
                   under_way: str = "prompt 1/5 rep 1/50") -> tuple[int, str]:
    """Start a long job, wait until timed generation is under way, send the signals; returns
    the exit code and what it printed after them."""
    process = subprocess.Popen([sys.executable, "-m", "falcon_exp", *args], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                               env=os.environ)
    for line in process.stderr:
        if under_way in line:
            break
    for each in signals:
        process.send_signal(each)
        time.sleep(0.05)
    _, rest = process.communicate(timeout=120)
    return process.returncode, rest


@pytest.mark.parametrize("signals", [(signal.SIGINT,), (signal.SIGTERM, signal.SIGINT, signal.SIGTERM)],
                         ids=["ctrl-c", "sigterm, then more during shutdown"])
def test_a_signal_ends_the_run_and_its_sweep_killed_in_one_line(tmp_path, store, signals):
    """Ctrl-C, SLURM's SIGTERM (time limit, pre-emption), SIGHUP; more signals while stopping
    wait for the runs to close rather than leave them RUNNING."""
    code, rest = start_and_stop(tmp_path, *signals)
    assert code == 128 + signals[0].value
    assert "Traceback" not in rest
    assert rest.strip().splitlines()[-1].startswith(f"falcon-exp: stopped by {signals[0].name}; the running job and its sweep are KILLED")
    runs, _ = runs_of(store)
    assert [r.info.status for r in runs] == ["KILLED", "KILLED"]  # the sweep, and the one job it reached
    assert runs[1].data.tags["mlflow.parentRunId"] == runs[0].info.run_id
    assert runs[1].data.tags["falcon_exp.error"] == f"stopped by {signals[0].name}"


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


def test_two_sweeps_started_together_keep_their_own_folders_and_runs_and_log_no_secret(tmp_path, two_prompts):
    """Two sweeps start at once on a store that does not exist yet (its creation is serialised),
    each in its own folder with its own runs; no secret from the environment is stored anywhere."""
    secret = "hf_do_not_log_this_0123456789"
    env = os.environ | {"HF_TOKEN": secret, "MLFLOW_TRACKING_TOKEN": secret, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    command = [sys.executable, "-m", "falcon_exp", "-m", "bits=4", *QUICK, f"prompts.file={two_prompts}"]
    sweeps = [subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for sweep in sweeps:
        assert sweep.wait(timeout=300) == 0, sweep.stderr.read()[-2000:]
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
    command = [sys.executable, "-m", "falcon_exp", "-m", "bits=4,8", *QUICK, f"prompts.file={two_prompts}", "tracking.experiment=restart"]
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}  # a user's own limit wins over falcon-exp's 3
    sweep = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env)
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
        sweep.wait(timeout=60)
        assert sweep.returncode == 1 and failures
        failed = {re.search(r"job bits=(\d+) FAILED", line).group(1) for line, _ in failures}
        assert failed == {"8"}
        for line, after_s in failures:
            assert after_s < 120 and ("unreachable" in line or "Connection" in line), line
        again = subprocess.run([*command, "resume=true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
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

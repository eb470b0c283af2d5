"""Fault injection: a sweep stopped with Ctrl-C, a re-run that resumes, a tracking server that
goes away mid-sweep, and no secret in the store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import QUICK, run_cli, runs_of, start_mlflow_server

pytestmark = pytest.mark.slow


def test_ctrl_c_marks_the_run_and_its_sweep_killed_and_keeps_the_store(tmp_path, store):
    args = [a for a in QUICK if not a.startswith(("max_new_tokens", "repetitions", "warmup"))] + ["warmup=0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "falcon_exp", "-m", "bits=4,8", *args, "max_new_tokens=64", "repetitions=50"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=os.environ,
    )
    for line in process.stderr:  # wait until timed generation is under way
        if "prompt 1/5 rep 1/50" in line:
            break
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode != 0
    runs, _ = runs_of(store)
    assert [r.info.status for r in runs] == ["KILLED", "KILLED"]  # the sweep, and the one job it reached
    assert runs[1].data.tags["mlflow.parentRunId"] == runs[0].info.run_id


def test_resume_skips_finished_jobs_and_nothing_secret_is_logged(tmp_path, store, two_prompts):
    secret = "hf_do_not_log_this_0123456789"
    env = {"HF_TOKEN": secret, "MLFLOW_TRACKING_TOKEN": secret}
    first = run_cli("-m", "bits=4,8", *QUICK, f"prompts.file={two_prompts}", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli("-m", "bits=4,8,16", *QUICK, f"prompts.file={two_prompts}", "resume=true", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("skipping") == 2 and "(resume=true)" in again.stderr
    runs, _ = runs_of(store)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(c.data.params["bits"] for c in children) == ["16", "4", "8"]
    assert all(r.info.status == "FINISHED" for r in runs)
    files = [tmp_path / "mlflow.db", *(p for p in (tmp_path / "artifacts").rglob("*") if p.is_file())]
    assert len(files) > 10
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


def test_a_server_that_goes_away_mid_sweep_fails_fast_and_keeps_what_it_had(tmp_path, two_prompts):
    process, uri = start_mlflow_server(tmp_path)
    port = int(uri.rsplit(":", 1)[1])
    sweep = subprocess.Popen(
        [sys.executable, "-m", "falcon_exp", "-m", "bits=4,8,16", *QUICK, f"prompts.file={two_prompts}"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=os.environ | {"MLFLOW_TRACKING_URI": uri},
    )
    try:
        for line in sweep.stderr:
            if " FINISHED in " in line:  # the first job is in the store: take the server away
                process.terminate()
                process.wait(timeout=30)
                break
        start = time.monotonic()
        _, rest = sweep.communicate(timeout=300)
        assert time.monotonic() - start < 240
        assert sweep.returncode != 0
        last = rest.strip().splitlines()[-1]
        assert uri in last and "unreachable" in last and "Traceback" not in rest
    finally:
        sweep.kill()
        process.kill()
    process, uri = start_mlflow_server(tmp_path, port)  # the same store, served again
    try:
        runs, _ = runs_of(uri)
        finished = [r for r in runs if r.info.status == "FINISHED" and "mlflow.parentRunId" in r.data.tags]
        assert [r.data.params["bits"] for r in finished] == ["4"]
        assert finished[0].data.metrics["memory/weights_gb"] > 0
    finally:
        process.terminate()
        process.wait(timeout=30)

"""The analysis reads a real sweep from a real SQLite store and writes identical files twice."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import QUICK, run_cli, runs_of


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    """The analysis issue's sweep: 4- and 8-bit at two max_lengths, on the tiny Falcon."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "two.yaml").write_text("- Name three colours.\n- What is an A/B test?\n")
    uri = f"sqlite:///{root}/mlflow.db"
    args = [a for a in QUICK if not a.startswith(("max_length", "max_new_tokens"))]
    done = run_cli("-m", "bits=4,8", "max_length=24,32", *args, f"prompts.file={root / 'two.yaml'}", cwd=root,
                   env={"MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 0, done.stderr[-3000:]
    return uri


def analyse_in(folder, uri, *args):
    folder.mkdir()
    done = subprocess.run([sys.executable, "-m", "falcon_exp.analysis", *args], cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_two_runs_in_two_folders_write_identical_figures_and_tables(tmp_path, sweep_store):
    first = analyse_in(tmp_path / "a", sweep_store)
    analyse_in(tmp_path / "b", sweep_store)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".png"]) >= 3
    assert {"figures/time_vs_max_length.png", "figures/comparison.csv", "figures/comparison.md", "figures/comparison.tex"} <= {str(f) for f in files}
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert "read 4 runs of sweep" in first
    table = (tmp_path / "a" / "figures" / "comparison.md").read_text()
    assert "| nf4 |" in table and "| int8 |" in table
    assert "KL vs ref" in table and "ppl zh" in table and "figures/quality_vs_memory.png" in {str(f) for f in files}


def test_table_numbers_are_the_logged_metrics(tmp_path, sweep_store):
    from falcon_exp.analysis import tables
    from falcon_exp.analysis.load import load

    loaded = load(sweep_store)
    table = tables.comparison(loaded.runs)
    runs, _ = runs_of(sweep_store)
    by_config = {(r.data.params["mode"], int(r.data.params["max_length"])): r.data.metrics for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(table) == len(by_config) == 4
    for row in table.to_dict("records"):
        logged = by_config[(row["mode"], row["max_length"])]
        for key in ("memory/weights_gb", "time/decode_ms_per_token", "time/decode_ms_per_token.rep_std", "time/ttft_ms",
                    "time/e2e_tokens_per_s", "time/decode_tokens_per_s", "time/generate_s.rep_std"):
            assert row[key] == logged[key], key
        assert row["memory/peak_gb"] == logged["memory/peak_rss_gb"]
        reference = by_config[("int8", row["max_length"])]
        assert row["time/decode_ms_per_token / int8"] == logged["time/decode_ms_per_token"] / reference["time/decode_ms_per_token"]
    analyse_in(tmp_path / "c", sweep_store)
    csv = pd.read_csv(tmp_path / "c" / "figures" / "comparison.csv")
    for row, written in zip(table.to_dict("records"), csv.to_dict("records")):
        assert math.isclose(row["time/decode_ms_per_token"], written["time/decode_ms_per_token"], rel_tol=1e-9)


def test_roofline_rows_name_the_run_its_floor_and_its_commit(sweep_store):
    from falcon_exp.analysis import tables
    from falcon_exp.analysis.load import load

    table = tables.roofline(load(sweep_store).runs)
    runs, _ = runs_of(sweep_store)
    by_id = {r.info.run_id: r.data for r in runs}
    assert len(table) == 4 and set(table["mode"]) == {"eager"} and set(table["decode_path"]) == {"eager"}
    for row in table.to_dict("records"):
        logged = by_id[row["run_id"]]
        assert row["ms_per_token"] == logged.metrics["time/decode_ms_per_token"]
        assert row["roofline_fraction"] == logged.metrics["roofline_fraction"]
        assert row["commit"] == logged.tags["git.commit"][:7]
        # the threshold is LLM.int8's: shown for 8-bit rows only
        assert (row["int8_threshold"] == float(logged.params["quantization.int8_threshold"])) == (row["bits"] == 8)


def test_tidy_frame_has_a_row_per_run_and_prompt(sweep_store):
    from falcon_exp.analysis.load import load

    loaded = load(sweep_store)
    assert len(loaded.tidy) == 4 * 2
    assert {"bits", "max_length", "model.name", "time/decode_ms_per_token", "sample/time/generate_s"} <= set(loaded.tidy)
    assert len(loaded.samples) == 4 * 2 * 2  # runs x prompts x repetitions


def test_failed_runs_and_runs_missing_metrics_are_reported_and_left_out(tmp_path, sweep_store):
    from mlflow import MlflowClient

    runs, client = runs_of(sweep_store)
    parent = next(r for r in runs if "falcon_exp.sweep_dir" in r.data.tags).info.run_id
    experiment = runs[0].info.experiment_id
    failed = client.create_run(experiment, run_name="bits=4,crashed", tags={"mlflow.parentRunId": parent})
    client.log_param(failed.info.run_id, "bits", "4")
    client.set_terminated(failed.info.run_id, "FAILED")
    bare = client.create_run(experiment, run_name="bits=8,no-metrics", tags={"mlflow.parentRunId": parent})
    client.set_terminated(bare.info.run_id, "FINISHED")
    try:
        out = analyse_in(tmp_path / "d", sweep_store)
        assert "read 4 runs" in out
        assert "left out: bits=4,crashed" in out and "status FAILED" in out
        assert "left out: bits=8,no-metrics" in out and "no time/decode_ms_per_token" in out
    finally:
        MlflowClient(sweep_store).delete_run(failed.info.run_id)
        MlflowClient(sweep_store).delete_run(bare.info.run_id)


def test_unknown_experiment_is_one_line(tmp_path, sweep_store):
    done = subprocess.run([sys.executable, "-m", "falcon_exp.analysis", "--experiment", "nope"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": sweep_store})
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"falcon-exp: error: experiment 'nope' is not in {sweep_store}; it has: ")
    assert "falcon-exp" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_runs_of_an_earlier_release_are_read_under_todays_names(tmp_path):
    """`time/tokens_per_s` (end-to-end, prefill included) is `time/e2e_tokens_per_s` now."""
    from mlflow import MlflowClient

    from falcon_exp.analysis.load import load

    uri = f"sqlite:///{tmp_path}/old.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("falcon-exp"), run_name="bits=4")
    client.log_param(run.info.run_id, "mode", "nf4")
    for key, value in {"time/decode_ms_per_token": 20.0, "time/generate_s": 1.0, "memory/weights_gb": 0.1,
                       "time/tokens_per_s": 16.0, "sample/time/generate_s": 1.0, "sample/time/decode_ms_per_token": 20.0,
                       "sample/time/tokens_per_s": 16.0}.items():
        client.log_metric(run.info.run_id, key, value, step=0)
    client.set_terminated(run.info.run_id, "FINISHED")
    loaded = load(uri, sweep=None)
    assert loaded.runs.loc[0, "time/e2e_tokens_per_s"] == 16.0 and "time/tokens_per_s" not in loaded.runs
    assert loaded.samples.loc[0, "sample/time/e2e_tokens_per_s"] == 16.0

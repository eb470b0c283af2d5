"""The analysis reads a real sweep (the shared `tiny_sweep`) from a real SQLite store, in-process
as `falcon-exp-analysis` runs, and writes identical files twice."""

from __future__ import annotations

import math
import shutil
import statistics
import time

import pandas as pd
import pytest

from conftest import QUICK, run_cli, runs_of
from falcon_exp.analysis.__main__ import main as analysis_main

pytestmark = pytest.mark.slow


@pytest.fixture
def sweep_store(tiny_sweep):
    return tiny_sweep.uri


@pytest.fixture
def own_store(tiny_sweep, tmp_path):
    """A copy of the shared sweep's store, for a test that writes to it."""
    shutil.copy(tiny_sweep.root / "mlflow.db", tmp_path / "copy.db")
    return f"sqlite:///{tmp_path}/copy.db"


def analyse_in(folder, uri, monkeypatch, capsys, *args, code=0):
    """`falcon-exp-analysis ARGS` run in `folder` against `uri`; its output."""
    folder.mkdir(exist_ok=True)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert analysis_main(list(args)) == code
    captured = capsys.readouterr()
    return captured.out + captured.err


def test_two_runs_in_two_folders_write_identical_figures_and_tables(tmp_path, sweep_store, monkeypatch, capsys):
    first = analyse_in(tmp_path / "a", sweep_store, monkeypatch, capsys)
    analyse_in(tmp_path / "b", sweep_store, monkeypatch, capsys)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".png"]) >= 3
    expected = {"figures/time_vs_max_length.png", "figures/comparison.csv", "figures/comparison.md", "figures/comparison.tex",
                "figures/quality_vs_memory.png", "figures/roofline.csv"}
    assert expected <= {str(f) for f in files}
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert "read 6 runs of sweep" in first
    table = (tmp_path / "a" / "figures" / "comparison.md").read_text()
    assert "| nf4 |" in table and "| int8 |" in table and "| bf16 |" in table
    assert "KL vs ref" in table and "ppl zh" in table
    assert "the lowest, the highest of the repetitions' medians" in table  # the table says what its range is over
    assert "decode ms/token vs bf16" in table.splitlines()[0] and "/ bf16" not in table.splitlines()[0]
    results = pd.read_csv(tmp_path / "a" / "figures" / "results.csv")
    assert set(zip(results["mode"], results["backend"])) == {("nf4", "bitsandbytes"), ("int8", "bitsandbytes"), ("bf16", "none")}
    assert "backend" not in table.splitlines()[0]  # one backend and the baseline: nothing to tell apart


def test_table_numbers_are_the_logged_metrics(tmp_path, sweep_store, monkeypatch, capsys):
    from mlflow import MlflowClient

    from falcon_exp.analysis import tables
    from falcon_exp.analysis.load import load

    loaded = load(sweep_store)
    table = tables.comparison(loaded.runs, loaded.samples)
    runs, _ = runs_of(sweep_store)
    by_config = {(r.data.params["mode"], int(r.data.params["max_length"])): r.data.metrics
                 for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(table) == len(by_config) == 6
    medians_of_repetitions = {}
    for run in runs:
        if "mlflow.parentRunId" in run.data.tags:
            history = MlflowClient(sweep_store).get_metric_history(run.info.run_id, "sample/time/decode_ms_per_token")
            reps = int(run.data.params["repetitions"])
            by_rep = [statistics.median(p.value for p in history if p.step % reps == r) for r in range(reps)]
            medians_of_repetitions[(run.data.params["mode"], int(run.data.params["max_length"]))] = {(min(by_rep), max(by_rep))}
    for row in table.to_dict("records"):
        logged = by_config[(row["mode"], row["max_length"])]
        for key in ("memory/weights_gb", "time/decode_ms_per_token", "time/decode_ms_per_token.rep_std", "time/ttft_ms",
                    "time/e2e_tokens_per_s", "time/decode_tokens_per_s", "time/generate_s.rep_std"):
            assert row[key] == logged[key], key
        assert row["memory/peak_gb"] == logged["memory/peak_rss_gb"]
        reference = by_config[("bf16", row["max_length"])]
        assert row["time/decode_ms_per_token / bf16"] == logged["time/decode_ms_per_token"] / reference["time/decode_ms_per_token"]
        # the range between repetitions: each repetition's median over the prompts, lowest and highest (a time: above zero)
        low, high = row["time/decode_ms_per_token" + tables.REP_LOW], row["time/decode_ms_per_token" + tables.REP_HIGH]
        assert 0 < low <= high and (low, high) in medians_of_repetitions[(row["mode"], row["max_length"])]
    analyse_in(tmp_path / "c", sweep_store, monkeypatch, capsys)
    csv = pd.read_csv(tmp_path / "c" / "figures" / "comparison.csv")
    for row, written in zip(table.to_dict("records"), csv.to_dict("records")):
        assert math.isclose(row["time/decode_ms_per_token"], written["time/decode_ms_per_token"], rel_tol=1e-9)


def test_roofline_rows_name_the_run_its_floor_and_its_commit(sweep_store):
    from falcon_exp.analysis import tables
    from falcon_exp.analysis.load import load

    table = tables.roofline(load(sweep_store).runs)
    runs, _ = runs_of(sweep_store)
    by_id = {r.info.run_id: r.data for r in runs}
    assert len(table) == 6 and set(table["mode"]) == {"eager"} and set(table["decode_path"]) == {"eager"}
    for row in table.to_dict("records"):
        logged = by_id[row["run_id"]]
        assert row["ms_per_token"] == logged.metrics["time/decode_ms_per_token"]
        assert row["roofline_fraction"] == logged.metrics["roofline_fraction"]
        assert row["floor_ms_per_token"] == logged.metrics["roofline/floor_ms_per_token"]  # as logged, not a product of medians
        assert row["bandwidth"] == "read" and row["read_bandwidth_gbs"] == logged.metrics["roofline/read_bandwidth_gbs"]
        assert row["commit"] == logged.tags["git.commit"][:7]
        # the settings that apply at the run's bits: LLM.int8's threshold for 8-bit rows, none unquantized
        threshold = f"int8_threshold={float(logged.params['quantization.bitsandbytes.int8_threshold'])}"
        assert (row["settings"] == threshold) == (row["bits"] == 8) and (row["settings"] == "") == (row["bits"] == 16)


def test_a_named_commit_is_shown_whole_and_a_hash_short():
    import pandas as pd

    from falcon_exp.analysis.tables import short_commits

    commits = pd.Series(["c62cfee+async", "da6f0e3" + "0" * 33, "da6f0e3", ""])
    assert short_commits(commits).tolist() == ["c62cfee+async", "da6f0e3", "da6f0e3", ""]


def test_the_baseline_is_labelled_without_quantization_settings():
    """A sweep over a group size and bits=4,16: the group names the 4-bit runs, not bf16's."""
    from falcon_exp.analysis.figures import _label
    from falcon_exp.analysis.load import MODE

    runs = pd.DataFrame({MODE: ["marlin4", "marlin4", "bf16"], "bits": ["4", "4", "16"], "quantization.marlin.group_size": ["64", "128", "64"],
                         "max_length": ["60", "60", "48"]})
    keys = ["bits", "quantization.marlin.group_size", "max_length"]
    assert _label(runs, keys).tolist() == ["marlin4, group_size=64, max_length=60", "marlin4, group_size=128, max_length=60", "bf16, max_length=48"]


def test_tidy_frame_has_a_row_per_run_and_prompt(sweep_store):
    from falcon_exp.analysis.load import load

    loaded = load(sweep_store)
    assert len(loaded.tidy) == 6 * 2
    assert {"bits", "max_length", "model.name", "time/decode_ms_per_token", "sample/time/generate_s"} <= set(loaded.tidy)
    assert len(loaded.samples) == 6 * 2 * 2  # runs x prompts x repetitions


def test_failed_runs_and_runs_missing_metrics_are_reported_and_left_out(tmp_path, own_store, monkeypatch, capsys):
    runs, client = runs_of(own_store)
    parent = next(r for r in runs if "falcon_exp.sweep_dir" in r.data.tags).info.run_id
    experiment = runs[0].info.experiment_id
    failed = client.create_run(experiment, run_name="bits=4,crashed", tags={"mlflow.parentRunId": parent})
    client.log_param(failed.info.run_id, "bits", "4")
    client.set_terminated(failed.info.run_id, "FAILED")
    bare = client.create_run(experiment, run_name="bits=8,no-metrics", tags={"mlflow.parentRunId": parent})
    client.set_terminated(bare.info.run_id, "FINISHED")
    out = analyse_in(tmp_path / "d", own_store, monkeypatch, capsys)
    assert "read 6 runs" in out
    assert "left out: bits=4,crashed" in out and "status FAILED" in out
    assert "left out: bits=8,no-metrics" in out and "no time/decode_ms_per_token" in out


def test_a_sweep_with_one_finished_run_is_analysed(tmp_path, own_store, monkeypatch, capsys):
    """What a resumed sweep that re-ran one job leaves: one run, every table and figure still written."""
    runs, client = runs_of(own_store)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    for child in children[1:]:
        client.delete_run(child.info.run_id)
    out = analyse_in(tmp_path / "e", own_store, monkeypatch, capsys)
    assert "read 1 runs" in out
    written = {p.name for p in (tmp_path / "e" / "figures").iterdir()}
    assert {"comparison.md", "results.csv", "roofline.csv", "memory_time_per_prompt.png", "tradeoff.png", "latency_per_prompt.png"} <= written


@pytest.mark.parametrize("args, says", [
    (("--experiment", "nope"), "experiment 'nope' is not in {uri}; it has: falcon-exp"),
    (("--sweep", "0123456789abcdef"), "--sweep '0123456789abcdef' is no run in {uri}"),
    (("--filter", "params.bits = = 4"), "--filter 'params.bits = = 4' is not an MLflow filter"),
], ids=["unknown experiment", "unknown sweep", "malformed filter"])
def test_bad_analysis_input_is_one_line_exit_2(tmp_path, sweep_store, monkeypatch, capsys, args, says):
    out = analyse_in(tmp_path / "f", sweep_store, monkeypatch, capsys, *args, code=2)
    assert out.strip().startswith("falcon-exp: error: " + says.format(uri=sweep_store)) and len(out.strip().splitlines()) == 1


def test_an_unusable_store_is_one_line_in_seconds_without_its_secrets(tmp_path, monkeypatch, capsys):
    """The analysis checks the store as a job does, and never creates one."""
    (tmp_path / "text.db").write_text("not a database")
    stores = {
        "http://falcon:secretpw@127.0.0.1:9": "the MLflow tracking server http://falcon:***@127.0.0.1:9 is unreachable",
        "http://tok3n-secretpw@127.0.0.1:9": "the MLflow tracking server http://***@127.0.0.1:9 is unreachable",
        "postgresql://falcon@127.0.0.1:9/mlflow?password=secretpw": "postgresql://falcon@127.0.0.1:9/mlflow?password=*** cannot be used",
        f"sqlite:///{tmp_path}/text.db": "is not a SQLite database (file is not a database)",
        f"sqlite:///{tmp_path}/none.db": "there is no MLflow store at",
        "sqlite://": "the MLflow store sqlite:// is in memory and keeps nothing",
        "foo://bar": "MLFLOW_TRACKING_URI='foo://bar' is not a store address",
    }
    for uri, says in stores.items():
        start = time.monotonic()
        out = analyse_in(tmp_path / "f", uri, monkeypatch, capsys, code=2)
        assert time.monotonic() - start < 30, uri
        assert out.startswith("falcon-exp: error: ") and says in out and len(out.strip().splitlines()) == 1, out
        assert "secretpw" not in out
    assert not (tmp_path / "none.db").exists()


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, sweep_store, monkeypatch, capsys, read_only):
    (tmp_path / "a-file").write_text("")
    for out, says in ((tmp_path / "a-file", "is a file, not a folder"), (read_only / "figures", "cannot be written")):
        said = analyse_in(tmp_path / "f", sweep_store, monkeypatch, capsys, "--out", str(out), code=2)
        assert said.startswith(f"falcon-exp: error: --out '{out}' {says}") and len(said.strip().splitlines()) == 1


def test_a_stopped_analysis_leaves_no_half_written_file(tmp_path, sweep_store, monkeypatch, capsys):
    """A real SIGINT at a few moments of the analysis: one line, exit 130, and every file there
    is whole (figures are written beside and moved into place)."""
    import os
    import signal
    import time

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep_store)
    started = time.perf_counter()
    assert analysis_main(["--out", str(tmp_path / "whole")]) == 0
    whole_s = time.perf_counter() - started  # the moments are fractions of it, so they fall inside on any machine
    capsys.readouterr()
    before = {each: signal.getsignal(each) for each in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM)}
    signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    stopped = 0
    try:
        for share in (0.15, 0.4, 0.65, 0.9):
            out = tmp_path / f"stopped-{share}"
            signal.setitimer(signal.ITIMER_REAL, share * whole_s)
            code = analysis_main(["--out", str(out)])
            signal.setitimer(signal.ITIMER_REAL, 0)
            said = capsys.readouterr().err
            if code == 130:
                stopped += 1
                assert said.strip().splitlines()[-1] == "falcon-exp: error: stopped by SIGINT; no file was left half-written"
            files = list(out.rglob("*")) if out.exists() else []
            assert not [f for f in files if f.name.startswith(".")], files  # no staging file left behind
            for pdf in (f for f in files if f.suffix == ".pdf"):
                assert pdf.read_bytes().rstrip().endswith(b"%%EOF"), pdf
            for png in (f for f in files if f.suffix == ".png"):
                assert png.read_bytes().endswith(b"IEND\xaeB`\x82"), png
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for each, handler in before.items():
            signal.signal(each, handler)
    assert stopped >= 2  # the moments fell inside the analysis


def test_nothing_selected_is_said_in_one_line(tmp_path, sweep_store, monkeypatch, capsys):
    out = analyse_in(tmp_path / "g", sweep_store, monkeypatch, capsys, "--sweep", "all", "--filter", "params.bits = '3'", code=1)
    assert "falcon-exp: nothing to analyse" in out


def test_runs_of_an_earlier_release_are_read_under_todays_names(tmp_path):
    """`time/tokens_per_s` (end-to-end, prefill included) is `time/e2e_tokens_per_s` now; backend and
    scheme, unlogged then, are what they were."""
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
    assert (loaded.runs.loc[0, "quantization.backend"], loaded.runs.loc[0, "scheme"]) == ("bitsandbytes", "nf4")  # the only one then


def test_runs_of_0_2_read_their_flat_settings_under_their_backend(tmp_path):
    """0.2 logged every backend's settings flat on every run (quantization.quant_type on a torchao
    run too): each is read under its backend's key, on that backend's runs alone."""
    from mlflow import MlflowClient

    from falcon_exp.analysis.load import load

    uri = f"sqlite:///{tmp_path}/old.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("falcon-exp")
    flat = {"quantization.quant_type": "fp4", "quantization.int8_threshold": "6.0", "quantization.group_size": "64",
            "quantization.torchao_8bit": "int8", "bits": "4"}
    for backend, mode, scheme in (("bitsandbytes", "fp4", "fp4"), ("torchao", "ao-int4", "int4_weight_only")):
        run = client.create_run(experiment, run_name=backend)
        for key, value in (flat | {"quantization.backend": backend, "mode": mode, "scheme": scheme}).items():
            client.log_param(run.info.run_id, key, value)
        for key in ("time/decode_ms_per_token", "time/generate_s", "memory/weights_gb", "sample/time/generate_s",
                    "sample/time/decode_ms_per_token"):
            client.log_metric(run.info.run_id, key, 1.0, step=0)
        client.set_terminated(run.info.run_id, "FINISHED")
    runs = load(uri, sweep=None).runs.set_index("quantization.backend")
    assert not any(key in runs for key in flat if key != "bits")
    assert runs.loc["bitsandbytes", "quantization.bitsandbytes.quant_type"] == "fp4"
    assert pd.isna(runs.loc["torchao", "quantization.bitsandbytes.quant_type"])
    assert runs.loc["torchao", "quantization.torchao.eight_bit"] == "int8" and runs.loc["torchao", "quantization.torchao.group_size"] == 64
    assert pd.isna(runs.loc["bitsandbytes", "quantization.torchao.group_size"])
    assert list(runs["generation.compile"]) == ["True", "True"]  # the fast path compiled then: as today's default logs it
    assert list(runs["quality.corpus"]) == ["None", "None"] and list(runs["batch_size"]) == [1, 1]
    assert "noise.reruns" not in runs  # no run before 0.3 checked noise: nothing is said for them


def test_a_sweep_over_backends_compares_them_by_mode_scheme_and_backend(tmp_path, monkeypatch, capsys):
    """`-m quantization.backend=bitsandbytes,torchao,hqq bits=4,16`: a run per backend and the bf16
    baseline once, each verified, with quality against the same reference, told apart in every table."""
    uri = f"sqlite:///{tmp_path}/backends.db"
    done = run_cli("-m", "quantization.backend=bitsandbytes,torchao,hqq", "bits=4,16", *QUICK, "quality.enabled=true", "repetitions=1",
                   cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, fresh=True)  # the backends' import noise is kept out
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ao-int4" in done.stderr and "Failed to load" not in done.stderr and "triton" not in done.stderr  # import noise stays out
    out = analyse_in(tmp_path / "f", uri, monkeypatch, capsys)
    assert "read 4 runs" in out
    results = pd.read_csv(tmp_path / "f" / "figures" / "results.csv")
    assert sorted(zip(results["backend"], results["mode"], results["scheme"])) == [
        ("bitsandbytes", "nf4", "nf4"), ("hqq", "hqq4", "hqq_4bit"), ("none", "bf16", "none"), ("torchao", "ao-int4", "int4_weight_only")]
    quantized = results[results["backend"] != "none"]
    assert (quantized["kl_mean"] > 0).all() and (quantized["weights_gb"] < results.loc[results["mode"] == "bf16", "weights_gb"].item()).all()
    from falcon_exp.analysis.load import load

    assert set(load(uri, sweep=None).runs.groupby("mode")["quant/quantized_layers"].first()) == {0, 16}
    assert "backend" in (tmp_path / "f" / "figures" / "comparison.md").read_text().splitlines()[0]
    comparison = pd.read_csv(tmp_path / "f" / "figures" / "comparison.csv")
    assert list(comparison["mode"]) == ["nf4", "ao-int4", "hqq4", "bf16"]  # the backends' order, then the baseline
    assert comparison["time/decode_ms_per_token / bf16"].notna().all()  # every backend against the one baseline


def test_a_sweep_over_batch_sizes_is_compared_by_batch_and_drawn_against_it(tmp_path, monkeypatch, capsys):
    """`-m bits=4,16 batch_size=1,2`: every run logs its batch and rates, the table groups by batch
    size, and the throughput figure is drawn."""
    uri = f"sqlite:///{tmp_path}/batch.db"
    done = run_cli("-m", "bits=4,16", "batch_size=1,2", *QUICK, "repetitions=1", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 0, done.stderr[-3000:]
    analyse_in(tmp_path / "f", uri, monkeypatch, capsys)
    folder = tmp_path / "f" / "figures"
    results = pd.read_csv(folder / "results.csv")
    assert sorted(zip(results["mode"], results["batch_size"])) == [("bf16", 1), ("bf16", 2), ("nf4", 1), ("nf4", 2)]
    assert list(results["aggregate_tokens_per_s"]) == pytest.approx(list(results["batch_size"] * results["decode_tokens_per_s"]), rel=1e-9)
    assert "batch_size" in (folder / "comparison.md").read_text().splitlines()[0]
    assert (folder / "throughput_vs_batch.png").stat().st_size > 0
    told = {r.data.params["batch_size"]: r.data.tags.get("falcon_exp.batch_prompts") for r in runs_of(uri)[0] if "batch_size" in r.data.params}
    assert told == {"1": None, "2": "5 prompts in 3 batches of 2, cycled to fill them; at least 2 distinct in each"}

"""A real `mlflow server` on a real PostgreSQL store with a shared artifact folder, as a lab runs
it: two sweeps write to it at once (one of them a joblib sweep of two workers) and lose no run,
metric or artifact, nor a parent/child link, and print no secret of its address; the analysis
reads them back; the MLflow UI, opened in headless Chromium, shows the runs and their `bits`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUICK, TWO_PROMPTS, runs_of

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1500,900", "--virtual-time-budget=20000"]
EXPERIMENT = "concurrent"
SWEEPS = {  # two sweeps started together: the first through joblib with two workers for its three jobs
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "bits=4,8,16"],
    "basic": ["bits=4"],
}
# The server takes any credentials: each sweep reaches it with a secret in the address (a password;
# a token given as the user name), which nothing it prints may show.
SECRET = "s3cret-in-the-address"
ADDRESSES = {"joblib": "http://falcon:{secret}@{host}", "basic": "http://{secret}@{host}"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweeps_on_server(pg_server, tmp_path_factory):
    uri, _ = pg_server
    root = tmp_path_factory.mktemp("concurrent")
    (root / "two.yaml").write_text(TWO_PROMPTS)
    common = [*QUICK, f"prompts.file={root / 'two.yaml'}", f"tracking.experiment={EXPERIMENT}"]
    host = uri.removeprefix("http://")
    started = {name: subprocess.Popen([sys.executable, "-m", "falcon_exp", "-m", *args, *common], cwd=root, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True,
                                      env=os.environ | {"MLFLOW_TRACKING_URI": ADDRESSES[name].format(secret=SECRET, host=host)})
               for name, args in SWEEPS.items()}
    for name, process in started.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name}: {err[-3000:]}"
        assert SECRET not in out + err and SECRET not in "".join(p.read_text() for p in root.rglob("*.log")), name
        assert f"runs are in {ADDRESSES[name].format(secret='***', host=host)}" in err
    return uri


def test_two_sweeps_at_once_lose_no_run_metric_artifact_or_link(sweeps_on_server):
    runs, client = runs_of(sweeps_on_server, EXPERIMENT)
    parents = {r.info.run_id: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(children) == 4 and all(r.info.status == "FINISHED" for r in runs)
    by_parent = {parent: [] for parent in parents}
    for child in children:
        by_parent[child.data.tags["mlflow.parentRunId"]].append(child.data.params["bits"])
    assert sorted(sorted(bits) for bits in by_parent.values()) == [["16", "4", "8"], ["4"]]  # each job under its own sweep
    names = {}
    for child in children:  # the same metrics for every job of a mode, in either sweep
        names.setdefault(child.data.params["mode"], set()).add(frozenset(child.data.metrics))
    assert all(len(sets) == 1 for sets in names.values()), names
    for child in children:
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"generations.jsonl", "generations.json", "config"} <= artifacts
        rows = [json.loads(line) for line in Path(client.download_artifacts(child.info.run_id, "generations.jsonl")).read_text().splitlines()]
        history = sorted(client.get_metric_history(child.info.run_id, "sample/time/decode_ms_per_token"), key=lambda m: m.step)
        assert [m.value for m in history] == [r["decode_ms_per_token"] for r in rows] and len(rows) == 2 * 2


def test_the_analysis_reads_the_server_back(sweeps_on_server):
    from falcon_exp.analysis.load import load

    loaded = load(sweeps_on_server, experiment=EXPERIMENT, sweep=None)  # both sweeps
    assert sorted(loaded.runs["mode"]) == ["bf16", "int8", "nf4", "nf4"]
    assert not loaded.skipped and len(loaded.samples) == 4 * 2 * 2


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(BROWSER is None and not os.environ.get("FALCON_EXP_REQUIRE_BROWSER"), reason="no chromium here")
def test_the_ui_shows_the_runs_and_bits_in_a_real_browser(sweeps_on_server, tmp_path):
    assert BROWSER, "FALCON_EXP_REQUIRE_BROWSER is set but chromium is not installed"
    from mlflow import MlflowClient

    uri = sweeps_on_server
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    children = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" in r.data.tags]
    ids = json.dumps([r.info.run_id for r in children])
    compare = f"{uri}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment])}"
    dom = chromium("--dump-dom", compare, profile=tmp_path / "p1").stdout
    for run in children:
        assert run.info.run_name in dom, run.info.run_name
    assert "bits" in dom and "nf4" in dom and "int8" in dom
    shot = tmp_path / "compare.png"
    chromium(f"--screenshot={shot}", compare, profile=tmp_path / "p2")
    assert shot.stat().st_size > 20_000  # the README's picture is docs/screenshot.py's, of the main job's runs

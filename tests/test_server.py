"""A real `mlflow server` on loopback: a sweep logs to it, the analysis reads it back, and the
MLflow UI, opened in headless Chromium, shows both runs and their `bits`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import QUICK, run_cli, start_mlflow_server

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1500,900", "--virtual-time-budget=20000"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    process, uri = start_mlflow_server(root)
    yield uri, root
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def sweep_on_server(server):
    uri, root = server
    (root / "two.yaml").write_text("- Name three colours.\n- What is an A/B test?\n")
    done = run_cli("-m", "bits=4,8", *QUICK, f"prompts.file={root / 'two.yaml'}", cwd=root, env={"MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 0, done.stderr[-3000:]
    return uri, root


def test_a_sweep_against_a_server_finishes_and_reads_back(sweep_on_server, tmp_path):
    from falcon_exp.analysis.load import load

    uri, _ = sweep_on_server
    loaded = load(uri)
    assert sorted(loaded.runs["mode"]) == ["int8", "nf4"]
    assert not loaded.skipped and len(loaded.samples) == 2 * 2 * 2


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(BROWSER is None and not os.environ.get("FALCON_EXP_REQUIRE_BROWSER"), reason="no chromium here")
def test_the_ui_shows_both_runs_and_bits_in_a_real_browser(sweep_on_server, tmp_path):
    assert BROWSER, "FALCON_EXP_REQUIRE_BROWSER is set but chromium is not installed"
    from mlflow import MlflowClient

    uri, _ = sweep_on_server
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("falcon-exp").experiment_id
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

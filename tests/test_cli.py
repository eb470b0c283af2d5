"""The real command line: `-m` sweeps in a subprocess against a real SQLite store."""

from __future__ import annotations

import time

import pytest

from conftest import QUICK, REPO, run_cli, runs_of, save_tiny_falcon

pytestmark = pytest.mark.slow


def test_bad_input_is_one_line_exit_2_and_no_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/never.db"
    cases = {
        ("bits=3",): "bits=3 is not allowed; choose one of: 4, 8, 16",
        ("-m", "model=nope,tiny-falcon"): "model='nope' is not allowed; choose one of:",
        ("model=tiny-falcon", "prompts.file=missing.yaml"): "prompts.file='missing.yaml' is not a file",
        ("-m", "model=tiny-falcon", "bits=4,5"): "bits=5 is not allowed",
        ("model=tiny-falcon", "max_length=100000"): "max_length=100000 runs past tiny-falcon's context of 2048 tokens",
        ("nosuchkey=1",): "Could not override 'nosuchkey'. To append to your config use +nosuchkey=1 (Key 'nosuchkey' is not in struct)",
        ("bits=[",): "no viable alternative at input '['",
    }  # the other checks' messages: tests/test_config.py, in-process
    fresh = {("bits=3",), ("-m", "model=tiny-falcon", "bits=4,5"), ("model=tiny-falcon", "max_length=100000"), ("bits=[",)}
    # ^ in a new interpreter, one per path (a run, a sweep, a resolved job, Hydra's parser): nothing imported says a word first
    for args, message in cases.items():
        done = run_cli(*args, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, fresh=args in fresh)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("falcon-exp: error: ") and message in lines[0], (args, lines[-5:])
    assert not (tmp_path / "never.db").exists()


STORES = {  # an unusable store: (what is printed of it, what is said)
    "http://127.0.0.1:9": ("http://127.0.0.1:9", "is unreachable"),
    "http://falcon:s3cret-pass@127.0.0.1:9": ("http://falcon:***@127.0.0.1:9", "is unreachable"),
    "sqlite:////proc/falcon-exp/mlflow.db": ("sqlite:////proc/falcon-exp/mlflow.db", "cannot be created"),
    "sqlite:///{tmp}": ("sqlite:///{tmp}", "is a directory"),
    "postgresql://falcon:s3cret-pass@127.0.0.1:9/mlflow": ("postgresql://falcon:***@127.0.0.1:9/mlflow", "cannot be used"),
}


def test_an_unusable_tracking_store_fails_fast_naming_it_without_its_password(tmp_path, monkeypatch):
    """The store check every job makes first, for each kind of store; then the command line's
    one line and exit 2 for one of them."""
    from falcon_exp import store
    from falcon_exp.errors import FalconExpError

    for uri, (shown, says) in STORES.items():
        uri, shown = uri.format(tmp=tmp_path), shown.format(tmp=tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        start = time.monotonic()
        with pytest.raises(FalconExpError) as error:
            store.check()
        assert time.monotonic() - start < 60, uri  # not MLflow's minutes of retries
        assert shown in str(error.value) and says in str(error.value) and "s3cret-pass" not in str(error.value)
    done = run_cli("model=tiny-falcon", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "http://falcon:s3cret-pass@127.0.0.1:9"}, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "s3cret-pass" not in done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("falcon-exp: error: ") and "http://falcon:***@127.0.0.1:9 is unreachable" in last


def test_the_console_command_has_a_short_help_shell_completion_and_its_own_log_file(tmp_path):
    """`falcon-exp` is the installed command: what `python -m falcon_exp` does, under the app's name."""
    import shutil
    import subprocess

    command = shutil.which("falcon-exp")
    assert command, "the console script falcon-exp is not installed"
    help_page = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=60)
    assert help_page.returncode == 0 and help_page.stdout.startswith("falcon-exp: what does quantizing")
    assert "bits                         4, 8 (quantization.backend's) or 16" in help_page.stdout and "model: " in help_page.stdout
    assert "magical object" not in help_page.stdout  # not the whole config with its prompt list
    completion = subprocess.run([command, "-sc", "install=bash"], capture_output=True, text=True, timeout=60)
    assert completion.returncode == 0 and "complete" in completion.stdout and "falcon-exp" in completion.stdout
    done = subprocess.run([command, "model=tiny-falcon", "experiment=article", "--cfg", "job"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert done.returncode == 0 and "setting: article" in done.stdout  # the preset group's old name still works
    assert "`experiment=` is now `preset=`" in done.stderr


def test_readme_names_the_commands_it_promises():
    readme = (REPO / "README.md").read_text()
    for command in ('pip install -e ".[dev]" -c constraints.txt', "python -m falcon_exp -m bits=4,8", "python -m pytest"):
        assert command in readme


def test_a_failing_job_is_logged_failed_and_the_sweep_goes_on(tmp_path, store, two_prompts):
    """A local checkpoint loads; a copy with corrupt weights fails at load time."""
    import shutil

    good, bad = save_tiny_falcon(tmp_path / "good"), tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    args = [a for a in QUICK if not a.startswith("model=")]
    done = run_cli("-m", f"model.path={good},{bad}", "bits=8", *args, f"prompts.file={two_prompts}", cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "1 of 2 jobs failed" in done.stderr and "Traceback" not in done.stderr
    runs, client = runs_of(store)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.data.params["model.name"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert parent.info.status == "FAILED"
    assert children["good"].info.status == "FINISHED" and children["good"].data.params["model.weights"] == "hub"
    assert children["bad"].info.status == "FAILED" and children["bad"].data.tags["falcon_exp.error"]
    assert "error.txt" in {a.path for a in client.list_artifacts(children["bad"].info.run_id)}


def test_the_fast_path_from_the_command_line_logs_its_path_and_why_it_has_no_graph(tmp_path, store, two_prompts):
    done = run_cli("generation.fast=true", "bits=4", *QUICK, f"prompts.file={two_prompts}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,), _ = runs_of(store)
    assert run.info.status == "FINISHED" and run.data.params["generation.fast"] == "True"
    assert run.data.tags["falcon_exp.decode_path"] == "static_cache"
    assert "CUDA graphs need a CUDA device" in run.data.tags["falcon_exp.fast_fallback"]
    assert run.data.metrics["tokens/new_tokens_total"] == 2 * 2 * 6
    assert 0 <= run.data.metrics["time/fast_prepare_s"] < 60  # no compile, no capture on a CPU: the cache's allocation alone
    logs = list(tmp_path.glob("outputs/*/*/*.log"))
    assert [p.name for p in logs] == ["falcon-exp.log"]  # the job's log is named after the app, and holds its lines
    assert "fast path as static_cache" in logs[0].read_text()

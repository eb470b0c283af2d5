"""The real command line: `-m` sweeps in a subprocess against a real SQLite store."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import QUICK, REPO, run_cli, runs_of, save_tiny_falcon


def test_sweep_4_8_16_leaves_a_parent_and_three_finished_children(tmp_path, store, two_prompts):
    done = run_cli("-m", "bits=4,8,16", *QUICK, f"prompts.file={two_prompts}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs, client = runs_of(store)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert [c.data.params["bits"] for c in children] == ["4", "8", "16"]
    assert [c.data.params["mode"] for c in children] == ["nf4", "int8", "bf16"]
    for child, bits in zip(children, (4, 8, 16)):
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert f"bits={bits}" in child.info.run_name
        assert child.data.tags["falcon_exp.quantization_realised"] == {4: "4bit", 8: "8bit", 16: "none"}[bits]
        metrics = child.data.metrics
        for key in ("time/generate_s", "time/ttft_ms", "time/decode_ms_per_token", "time/e2e_tokens_per_s",
                    "time/decode_ms_per_token.rep_std", "memory/weights_gb", "memory/peak_rss_gb", "tokens/new_tokens_total"):
            assert key in metrics, key
        assert not [k for k in metrics if k.endswith((".p25", ".p75", ".std")) or k == "time/tokens_per_s"]
        assert metrics["tokens/new_tokens_total"] == 2 * 2 * 6  # prompts x repetitions x forced tokens
        assert metrics["tokens/warmup_tokens_total"] == 2 * 6  # the warm-up ran every prompt at full length
        assert child.data.params["quantization.quant_type"] == "nf4"
        assert child.data.tags["falcon_exp.decode_path"] == "eager" and "falcon_exp.fast_fallback" not in child.data.tags
        assert 0 < metrics["roofline_fraction"] < 1 and metrics["roofline/read_bandwidth_gbs"] > 0 and metrics["roofline/copy_bandwidth_gbs"] > 0
        assert child.data.tags["git.commit"] and child.data.tags["version.bitsandbytes"] != "absent"
        assert child.data.tags["cpu.capability"] and int(child.data.tags["cpu.cores"]) >= 1 and "cpu_count" not in child.data.tags
        assert ("falcon_exp.bnb_cpu_kernel" in child.data.tags) == (bits != 16)
        samples = {key: [m.value for m in sorted(client.get_metric_history(child.info.run_id, f"sample/{key}"), key=lambda m: m.step)]
                   for key in ("time/decode_ms_per_token", "time/generate_s", "time/e2e_tokens_per_s", "tokens/new_tokens",
                               "roofline/floor_ms_per_token", "roofline_fraction")}
        assert len(samples["time/generate_s"]) == 4  # steps 0..3: prompt_index * repetitions + repetition
        decode = samples["time/decode_ms_per_token"]
        # the spread is between the repetitions of a prompt (steps 0, 1 and 2, 3), then the median over prompts
        assert metrics["time/decode_ms_per_token.rep_std"] == pytest.approx(
            statistics.median([statistics.stdev(decode[0:2]), statistics.stdev(decode[2:4])]), rel=1e-12)
        assert metrics["time/decode_tokens_per_s"] == pytest.approx(1000 / metrics["time/decode_ms_per_token"], rel=1e-12)
        for new, seconds, rate in zip(samples["tokens/new_tokens"], samples["time/generate_s"], samples["time/e2e_tokens_per_s"]):
            assert rate == pytest.approx(new / seconds, rel=1e-12)  # the end-to-end rate counts the prefill's time
        for floor, ms, fraction in zip(samples["roofline/floor_ms_per_token"], decode, samples["roofline_fraction"]):
            assert fraction == pytest.approx(floor / ms, rel=1e-12)
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"generations.jsonl", "generations.json", "config", "hydra"} <= artifacts
        rows = [json.loads(line) for line in open(client.download_artifacts(child.info.run_id, "generations.jsonl", str(tmp_path / child.info.run_id)))]
        assert [(r["prompt_index"], r["repetition"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert rows[1]["prompt"] == "Name three colours." and all(r["new_tokens"] == 6 for r in rows)
    weights = [c.data.metrics["memory/weights_gb"] for c in children]
    assert weights[0] < weights[1] < weights[2]
    # quality against the unquantized reference: none lost at 16 bits, less at 8 than at 4
    kl = [c.data.metrics["quality/kl_mean"] for c in children]
    assert kl[2] == 0.0 and 0 < kl[1] < kl[0]
    assert children[2].data.metrics["quality/top1_agreement"] == 1.0
    for child in children:
        for lang in ("en", "zh"):
            assert 1 < child.data.metrics[f"quality/perplexity_{lang}"] < float("inf")
    assert "compare them with: mlflow ui --backend-store-uri" in done.stderr


def test_bad_input_is_one_line_exit_2_and_no_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/never.db"
    cases = {
        ("bits=3",): "bits=3 is not allowed; choose one of: 4, 8, 16",
        ("-m", "model=nope,tiny-falcon"): "model='nope' is not allowed; choose one of:",
        ("model=tiny-falcon", "max_length=4"): "max_length=4 leaves no room to generate",
        ("model=tiny-falcon", "prompts.file=missing.yaml"): "prompts.file='missing.yaml' does not exist",
        ("-m", "model=tiny-falcon", "bits=4,5"): "bits=5 is not allowed",
    }
    for args, message in cases.items():
        done = run_cli(*args, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
        assert done.returncode == 2, (args, done.stderr[-2000:])
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("falcon-exp: error: ") and message in lines[-1], (args, lines[-5:])
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "never.db").exists()


@pytest.mark.parametrize("uri, says", [("http://127.0.0.1:9", "is unreachable"), ("sqlite:////proc/falcon-exp/mlflow.db", "cannot be created")])
def test_an_unusable_tracking_store_fails_fast_naming_it(tmp_path, uri, says):
    done = run_cli("model=tiny-falcon", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, timeout=60)
    assert done.returncode == 2
    assert uri in done.stderr.splitlines()[-1] and says in done.stderr.splitlines()[-1] and "Traceback" not in done.stderr


def test_readme_names_the_commands_it_promises():
    readme = (REPO / "README.md").read_text()
    for command in ('pip install -e ".[dev]"', "python -m falcon_exp -m bits=4,8", "python -m pytest"):
        assert command in readme


@pytest.mark.parametrize("launcher", [("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"), ("hydra/launcher=submitit_local",)])
def test_parallel_and_cluster_launchers_log_every_job_into_one_store(tmp_path, store, two_prompts, launcher):
    """joblib runs jobs side by side; submitit's local executor stands in for SLURM."""
    done = run_cli("-m", *launcher, "bits=4,8", *QUICK, f"prompts.file={two_prompts}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs, _ = runs_of(store)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(c.data.params["mode"] for c in children) == ["int8", "nf4"]
    assert all(c.info.status == "FINISHED" for c in runs) and len(runs) == 3


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


@pytest.mark.parametrize("order", ["bits first", "max_length first"])
def test_each_model_loads_once_per_sweep_whatever_the_command_line_order(tmp_path, store, two_prompts, order):
    sweeps = ["bits=4,8", "max_length=40,48,56"]
    if order == "max_length first":
        sweeps.reverse()
    done = run_cli("-m", *sweeps, "model=tiny-falcon", "repetitions=1", "warmup=0", f"prompts.file={two_prompts}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    children = [r for r in runs_of(store)[0] if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    loaded = [c for c in children if c.data.tags["falcon_exp.model_reused"] == "false"]
    assert sorted(c.data.params["bits"] for c in loaded) == ["4", "8"]
    assert all("time/load_s" in c.data.metrics for c in loaded)
    assert not any("time/load_s" in c.data.metrics for c in children if c not in loaded)


def test_the_fast_path_from_the_command_line_logs_its_path_and_why_it_has_no_graph(tmp_path, store, two_prompts):
    done = run_cli("generation.fast=true", "bits=4", *QUICK, "quality.enabled=false", f"prompts.file={two_prompts}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,), _ = runs_of(store)
    assert run.info.status == "FINISHED" and run.data.params["generation.fast"] == "True"
    assert run.data.tags["falcon_exp.decode_path"] == "static_cache"
    assert "CUDA graphs need a CUDA device" in run.data.tags["falcon_exp.fast_fallback"]
    assert run.data.metrics["tokens/new_tokens_total"] == 2 * 2 * 6

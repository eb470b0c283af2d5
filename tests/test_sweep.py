"""One real `-m` sweep through the command line (the shared `tiny_sweep`), read back from its
SQLite store: the parent and its children, what each child logged, and models loaded once."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from conftest import runs_of

pytestmark = pytest.mark.slow
BITS = {"4": ("nf4", "4bit"), "8": ("int8", "8bit"), "16": ("bf16", "none")}


@pytest.fixture(scope="module")
def sweep(tiny_sweep):
    runs, client = runs_of(tiny_sweep.uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return tiny_sweep, parents, children, client


def samples_of(client, run, *keys):
    return {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, f"sample/{key}"), key=lambda m: m.step)]
            for key in keys}


def test_a_parent_run_and_a_finished_child_per_job_named_by_what_varies(sweep):
    tiny, parents, children, _ = sweep
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    # the jobs run grouped by weights although max_length came first on the command line
    assert [(c.data.params["bits"], c.data.params["max_length"]) for c in children] == [
        ("4", "24"), ("4", "32"), ("8", "24"), ("8", "32"), ("16", "24"), ("16", "32")]
    for child in children:
        bits = child.data.params["bits"]
        assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.run_name == f"bits={bits},max_length={child.data.params['max_length']}"  # only what varies
        assert (child.data.params["mode"], child.data.tags["falcon_exp.quantization_realised"]) == BITS[bits]
        assert child.data.tags["mlflow.source.name"] and child.data.tags["mlflow.source.git.commit"]  # MLflow's own source tags
    # what all jobs share is the parent's: in its name and as its params
    assert parent.data.params["model"] == "tiny-falcon" and parent.data.params["sweep.varying"] == "bits,max_length"
    assert parent.data.params["repetitions"] == "2" and "bits" not in parent.data.params
    assert parent.info.run_name.startswith("sweep ") and {"bits=4,8,16", "max_length=24,32"} <= set(parent.info.run_name.split())
    summary = tiny.done.stderr[tiny.done.stderr.index("mode   job"):]
    assert all(c.info.run_name in summary for c in children)  # the summary never cuts a name
    assert "compare them with: mlflow ui --backend-store-uri" in summary


def test_each_model_loads_once_and_a_reused_model_says_so(sweep):
    _, _, children, _ = sweep
    loaded = [c for c in children if c.data.tags["falcon_exp.model_reused"] == "false"]
    assert sorted(c.data.params["bits"] for c in loaded) == ["16", "4", "8"]
    assert all("time/load_s" in c.data.metrics for c in loaded)
    assert not any("time/load_s" in c.data.metrics for c in children if c not in loaded)


def test_every_child_logs_its_numbers_under_names_that_say_what_they_are(sweep):
    tiny, _, children, client = sweep
    for child in children:
        metrics, tags, bits = child.data.metrics, child.data.tags, child.data.params["bits"]
        for key in ("time/generate_s", "time/ttft_ms", "time/decode_ms_per_token", "time/e2e_tokens_per_s", "time/decode_tokens_per_s",
                    "time/decode_ms_per_token.rep_std", "memory/weights_gb", "memory/peak_rss_gb", "tokens/new_tokens_total"):
            assert key in metrics, key
        assert not [k for k in metrics if k.endswith((".p25", ".p75", ".std")) or k == "time/tokens_per_s"]
        samples = samples_of(client, child, "time/decode_ms_per_token", "time/generate_s", "time/e2e_tokens_per_s",
                             "tokens/new_tokens", "roofline/floor_ms_per_token", "roofline_fraction")
        assert len(samples["time/generate_s"]) == 4  # steps 0..3: prompt_index * repetitions + repetition
        new = samples["tokens/new_tokens"]
        assert metrics["tokens/new_tokens_total"] == sum(new) and new[0] == new[1] and new[2] == new[3]
        assert metrics["tokens/warmup_tokens_total"] == new[0] + new[2]  # the warm-up ran every prompt at full length
        decode = samples["time/decode_ms_per_token"]
        # the spread is between the repetitions of a prompt (steps 0, 1 and 2, 3), then the median over prompts
        assert metrics["time/decode_ms_per_token.rep_std"] == pytest.approx(
            statistics.median([statistics.stdev(decode[0:2]), statistics.stdev(decode[2:4])]), rel=1e-12)
        assert metrics["time/decode_tokens_per_s"] == pytest.approx(1000 / metrics["time/decode_ms_per_token"], rel=1e-12)
        for count, seconds, rate in zip(new, samples["time/generate_s"], samples["time/e2e_tokens_per_s"]):
            assert rate == pytest.approx(count / seconds, rel=1e-12)  # the end-to-end rate counts the prefill's time
        for floor, ms, fraction in zip(samples["roofline/floor_ms_per_token"], decode, samples["roofline_fraction"]):
            assert fraction == pytest.approx(floor / ms, rel=1e-12)
        assert 0 < metrics["roofline_fraction"] < 1 and metrics["roofline/read_bandwidth_gbs"] > 0
        assert metrics["roofline/copy_bandwidth_gbs"] > 0
        assert tags["falcon_exp.decode_path"] == "eager" and "falcon_exp.fast_fallback" not in tags
        assert tags["git.commit"] and tags["version.bitsandbytes"] != "absent"
        assert tags["cpu.capability"] and int(tags["cpu.cores"]) >= 1 and "cpu_count" not in tags
        assert ("falcon_exp.bnb_cpu_kernel" in tags) == (bits != "16")
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"generations.jsonl", "generations.json", "config", "hydra"} <= artifacts
        path = client.download_artifacts(child.info.run_id, "generations.jsonl", str(tiny.root / "downloads" / child.info.run_id))
        rows = [json.loads(line) for line in open(path)]
        assert [(r["prompt_index"], r["repetition"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert rows[1]["prompt"] == "Name three colours." and [r["new_tokens"] for r in rows] == new
        # every decode step's time is kept: their mean is the generation's decode time, their percentiles the run's tail
        for row, ms in zip(rows, decode):
            assert len(row["itl_ms"]) == row["new_tokens"] - 1 and statistics.fmean(row["itl_ms"]) == pytest.approx(ms, rel=1e-9)
        latencies = sorted(t for row in rows for t in row["itl_ms"])
        assert metrics["time/itl_count"] == len(latencies) == sum(new) - len(new)
        assert metrics["time/itl_p50_ms"] <= metrics["time/itl_p90_ms"] <= metrics["time/itl_p99_ms"] == latencies[-(-99 * len(latencies) // 100) - 1]
        assert metrics["time/ttft_p50_ms"] == sorted(r["ttft_ms"] for r in rows)[1]  # four generations: p50 only (p90 needs ten)
        assert "time/ttft_p90_ms" not in metrics and "time/ttft_p99_ms" not in metrics
        if not Path("/sys/class/powercap").is_dir():  # no energy counter on this machine: said, not guessed
            assert "energy/joules_per_token: no RAPL package energy counter" in tags["falcon_exp.unmeasured"]
            assert not [k for k in metrics if k.startswith("energy/")]


def test_quality_against_the_unquantized_reference(sweep):
    _, _, children, _ = sweep
    for length in ("24", "32"):
        by_bits = {c.data.params["bits"]: c.data.metrics for c in children if c.data.params["max_length"] == length}
        weights = [by_bits[b]["memory/weights_gb"] for b in ("4", "8", "16")]
        assert weights[0] < weights[1] < weights[2]
        kl = [by_bits[b]["quality/kl_mean"] for b in ("4", "8", "16")]
        assert kl[2] == 0.0 and 0 < kl[1] < kl[0]  # none lost at 16 bits, less at 8 than at 4
        assert by_bits["16"]["quality/top1_agreement"] == 1.0 and by_bits["16"]["quality/greedy_match"] == 1.0
        for metrics in by_bits.values():
            for lang in ("en", "zh"):
                assert 1 < metrics[f"quality/perplexity_{lang}"] < float("inf")

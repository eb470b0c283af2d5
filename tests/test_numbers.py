"""Every number is what its name says off the tested path too: pre-quantized checkpoints, early
stopping, a checkpoint that changes under the same path, a model evicted by the quality
reference. Real CLI runs on local tiny-Falcon checkpoints, each against its own SQLite store and
cache directory."""

from __future__ import annotations

import pytest
import yaml
from mlflow import MlflowClient

from conftest import run_cli, runs_of, save_tiny_falcon

pytestmark = pytest.mark.slow
FEW = ["repetitions=1", "warmup=0", "max_length=null", "quality.eval_tokens=32"]


@pytest.fixture
def isolated(tmp_path, store, monkeypatch):
    """Its own store and its own cache: no quality reference from another test can be found."""
    monkeypatch.setenv("FALCON_EXP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "two.yaml").write_text("- Name three colours.\n- What is an A/B test?\n")
    return tmp_path, store


def children(store):
    return [r for r in runs_of(store)[0] if "mlflow.parentRunId" in r.data.tags]


def test_a_prequantized_checkpoint_is_refused_when_it_holds_other_than_asked(isolated):
    tmp_path, store = isolated
    nf4 = save_tiny_falcon(tmp_path / "nf4", quantization=("model=tiny-falcon", "bits=4", "quantization.bitsandbytes.double_quant=true"))
    done = run_cli(f"model.path={nf4}", "bits=4", "quantization.bitsandbytes.quant_type=fp4", *FEW, "max_new_tokens=4", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert f"model.path='{nf4}' carries its own quantization_config" in line
    assert "quantization.bitsandbytes.quant_type asked fp4, found nf4; quantization.bitsandbytes.double_quant asked False, found True" in line
    client = MlflowClient(store)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []  # nothing logged


def test_a_prequantized_checkpoint_taken_as_found_is_logged_as_found(isolated):
    tmp_path, store = isolated
    nf4 = save_tiny_falcon(tmp_path / "nf4", quantization=("model=tiny-falcon", "bits=4", "quantization.bitsandbytes.double_quant=true"))
    done = run_cli(f"model.path={nf4}", "quantization.from_checkpoint=true", *FEW, "max_new_tokens=4",
                   f"prompts.file={tmp_path / 'two.yaml'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,), client = runs_of(store)
    assert run.info.status == "FINISHED"
    params = run.data.params
    bnb = "quantization.bitsandbytes."
    assert (params["bits"], params["mode"], params[bnb + "quant_type"], params[bnb + "double_quant"]) == ("4", "nf4", "nf4", "True")
    logged = yaml.safe_load(open(client.download_artifacts(run.info.run_id, "config/config.yaml")))  # what ran, not the defaults
    found = logged["quantization"]["bitsandbytes"]
    assert (logged["bits"], found["quant_type"], found["double_quant"]) == (4, "nf4", True)
    assert run.data.tags["falcon_exp.quantization_source"].startswith("checkpoint")
    assert run.data.tags["falcon_exp.quantization_realised"] == "4bit"
    # no unquantized reference exists for such weights: quality says so instead of a number
    assert not [k for k in run.data.metrics if k.startswith("quality/")]
    assert "quality/*: the checkpoint holds quantized weights" in run.data.tags["falcon_exp.unmeasured"]


def _greedy_tokens(path, prompt: str, count: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from falcon_exp.decode import EagerDecoder
    from falcon_exp.job import encode
    from falcon_exp.quantization import quantizable_linears

    with quantizable_linears():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = encode(AutoTokenizer.from_pretrained(path), prompt, chat_template=True)
    return EagerDecoder(model, 2).generate(ids, count, True, lambda: None)[0]


def test_a_bf16_run_that_stops_early_matches_itself(isolated):
    """With force_length=false a run ends at end-of-sequence; the reference must end by the same
    rule, or identical weights never match."""
    tmp_path, store = isolated
    plain = save_tiny_falcon(tmp_path / "plain")
    tokens = _greedy_tokens(plain, "What is an A/B test?", 8)
    stop = next(t for i, t in enumerate(tokens) if i >= 2 and t not in tokens[:i])  # a token it emits third or later
    eos = save_tiny_falcon(tmp_path / "eos", eos_token_id=stop)
    done = run_cli("-m", f"model.path={eos}", "bits=16", "force_length=false", *FEW, "max_new_tokens=12",
                   f"prompts.file={tmp_path / 'two.yaml'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = children(store)
    client = runs_of(store)[1]
    new = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "sample/tokens/new_tokens")}
    assert new[1] < 12  # the second prompt stopped at its end-of-sequence token
    assert run.data.metrics["quality/greedy_match"] == 1.0
    assert run.data.metrics["quality/kl_mean"] == 0.0


def test_a_reference_is_not_reused_when_the_weights_at_its_path_change(isolated):
    tmp_path, store = isolated
    path = save_tiny_falcon(tmp_path / "model", seed=0)
    args = ["bits=16", *FEW, "max_new_tokens=6", f"prompts.file={tmp_path / 'two.yaml'}"]
    first = run_cli(f"model.path={path}", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    save_tiny_falcon(path, seed=1)  # new weights, same path, same size
    second = run_cli(f"model.path={path}", *args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    runs, _ = runs_of(store)
    assert len(runs) == 2 and second.stderr.count("computing the bfloat16 reference") == 1
    for run in runs:  # each compared against its own weights
        assert run.data.metrics["quality/kl_mean"] == 0.0 and run.data.metrics["quality/top1_agreement"] == 1.0


def test_a_model_the_quality_reference_evicted_is_reloaded_and_says_so(isolated):
    """The second prompt set needs its own reference, which loads the unquantized model in the
    quantized one's place: that job loads its model again, and must not call it reused."""
    tmp_path, store = isolated
    (tmp_path / "other.yaml").write_text("- Describe a lighthouse.\n")
    done = run_cli("-m", f"prompts.file={tmp_path / 'two.yaml'},{tmp_path / 'other.yaml'}", "bits=4", "model=tiny-falcon",
                   *FEW, "max_new_tokens=4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = children(store)
    assert len(runs) == 2 and done.stderr.count("computing the bfloat16 reference") == 2
    for run in runs:
        assert run.data.tags["falcon_exp.model_reused"] == "false" and run.data.metrics["time/load_s"] > 0

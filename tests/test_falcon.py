"""Falcon-7B and -40B: configs that resolve offline, synthetic weights through the real loading
path, and a clear line when hub weights are missing."""

from __future__ import annotations

import time

import bitsandbytes as bnb
import pytest
import torch

from conftest import compose, load_config, run_cli
from falcon_exp.quantization import quantizable_linears, verify
from falcon_exp.weights import architecture_config, synthetic_state_dict


@pytest.mark.parametrize("name", ["falcon-7b-instruct", "falcon-40b-instruct"])
def test_synthetic_falcon_config_resolves_offline(tmp_path, name):
    done = run_cli(f"model={name}", "model.weights=synthetic", "--cfg", "job", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"name: {name}" in done.stdout and "weights: synthetic" in done.stdout


def test_architectures_match_the_published_shapes():
    seven, forty = architecture_config("falcon-7b"), architecture_config("falcon-40b")
    assert (seven.hidden_size, seven.num_hidden_layers, seven.num_attention_heads, seven.multi_query) == (4544, 32, 71, True)
    assert (forty.hidden_size, forty.num_hidden_layers, forty.num_attention_heads, forty.num_kv_heads) == (8192, 60, 128, 8)
    assert forty.new_decoder_architecture and forty.parallel_attn and seven.parallel_attn
    assert seven.vocab_size == forty.vocab_size == 65024


def test_missing_hub_weights_fail_in_seconds_with_one_line(tmp_path):
    start = time.monotonic()
    done = run_cli("model=falcon-40b-instruct", cwd=tmp_path,
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/s.db"},
                   fresh=True)  # HF_HOME is read when huggingface_hub is imported
    assert time.monotonic() - start < 60
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "tiiuae/falcon-40b-instruct is not in the Hugging Face cache" in line
    assert "hf download tiiuae/falcon-40b-instruct" in line and "model.weights=synthetic" in line


@pytest.mark.slow
@pytest.mark.parametrize("bits, layer", [(4, bnb.nn.Linear4bit), (8, bnb.nn.Linear8bitLt)])
def test_a_falcon_40b_layer_is_quantized_through_the_real_path(bits, layer):
    """One of its 60 layers at the full 40B attention width (hidden 8192, 128 heads, 8 KV groups,
    the grouped query_key_value only 40B has); a narrow MLP and a small vocabulary, plain layers
    that are not the point and would make the test minutes long on a CPU."""
    from transformers.models.falcon.modeling_falcon import FalconForCausalLM

    config = architecture_config("falcon-40b")
    config.num_hidden_layers, config.vocab_size, config.ffn_hidden_size = 1, 1024, 1024
    state = synthetic_state_dict(config, seed=0, dtype=torch.bfloat16, distinct=False)
    quant = compose("model=falcon-40b-instruct", "model.weights=synthetic", f"bits={bits}")
    with quantizable_linears():
        model = FalconForCausalLM.from_pretrained(
            None, config=config, state_dict=state, quantization_config=load_config(quant), dtype=torch.bfloat16, device_map="cpu"
        )
    quantized = [n for n, m in model.named_modules() if isinstance(m, layer)]
    assert len(quantized) == 4 and verify(model, quant, "cpu").quantized_layers == 4
    qkv = model.transformer.h[0].self_attention.query_key_value
    assert (qkv.in_features, qkv.out_features) == (8192, (128 + 2 * 8) * 64)
    with torch.inference_mode():
        logits = model(torch.tensor([[11, 200, 300]])).logits
    assert logits.shape == (1, 3, 1024) and torch.isfinite(logits).all()

"""The fast decoding path against transformers' generate, and the roofline's arithmetic."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from falcon_exp import roofline
from falcon_exp.config import CONF_DIR, JobConfig
from falcon_exp.decode import EagerDecoder, FastDecoder, graph_safe_falcon
from falcon_exp.measure import timed_generate
from falcon_exp.models import _load

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46, 47]]


def tiny_job(*overrides: str) -> JobConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return JobConfig.from_hydra(compose("config", overrides=["model=tiny-falcon", *overrides]))


@pytest.fixture(scope="module", params=[16, 4, 8])
def tiny(request):
    """float32 activations: in bf16 a random model's near-tied logits round differently when the
    static cache's attention spans its padded length, which tests rounding, not the decoder."""
    job = tiny_job(f"bits={request.param}", "dtype=float32", "quantization.compute_dtype=float32")
    return job, _load(job, "cpu").model


@pytest.mark.parametrize("force_length", [True, False])
def test_fast_path_picks_the_same_tokens_as_generate(tiny, force_length):
    job, model = tiny
    fast = FastDecoder(model, max_tokens=8 + 24, quantization=job.quantization, device="cpu")
    eager = EagerDecoder(model, pad_token_id=2)
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        expected = eager.generate(ids, 24, force_length, on_token=lambda: None)
        assert fast.generate(ids, 24, force_length, on_token=lambda: None) == expected
        if force_length:
            assert len(expected) == 24


def test_the_compiled_decode_step_picks_the_same_tokens(tiny):
    """On a GPU the step is compiled before capture; compiled here, on the CPU, it must still
    pick generate's tokens (bf16, nf4 and int8 weights), and dynamo must really have compiled it."""
    from torch._dynamo.utils import counters

    job, model = tiny
    fast = FastDecoder(model, max_tokens=8 + 12, quantization=job.quantization, device="cpu")
    torch._dynamo.reset()
    counters.clear()
    fast._step = torch.compile(fast._step, dynamic=False)
    ids = torch.tensor([PROMPTS[2]])
    with graph_safe_falcon():
        assert fast.generate(ids, 12, True, lambda: None) == EagerDecoder(model, 2).generate(ids, 12, True, lambda: None)
    assert counters["stats"]["unique_graphs"] >= 1


def test_fast_path_without_cuda_says_why_and_times_every_token(tiny):
    job, model = tiny
    fast = FastDecoder(model, max_tokens=32, quantization=job.quantization, device="cpu")
    assert fast.path == "static_cache" and "CUDA graphs need a CUDA device" in fast.fallback
    timing, generated = timed_generate(fast, torch.tensor([PROMPTS[0]]), 10, True, "cpu")
    assert len(generated) == timing.new_tokens == 10
    assert 0 < timing.ttft_ms and timing.ttft_ms + 9 * timing.decode_ms_per_token <= timing.generate_s * 1e3 + 1e-6


def test_int8_with_outlier_threshold_names_why_it_cannot_be_graphed():
    job = tiny_job("bits=8", "quantization.int8_threshold=6.0")
    decoder = FastDecoder.__new__(FastDecoder)
    decoder.model = torch.nn.Linear(2, 2)
    assert "int8_threshold=6.0" in decoder._why_no_graph(job.quantization, "cuda")
    assert decoder._why_no_graph(tiny_job("bits=8", "quantization.int8_threshold=0").quantization, "cuda") is None


def test_generation_fast_is_validated():
    from falcon_exp.config import ConfigError

    with pytest.raises(ConfigError, match="generation.fast='yes' is not allowed; choose true or false"):
        tiny_job("generation.fast=yes")
    assert tiny_job("generation.fast=true").generation.fast is True


def test_bytes_per_step_count_weights_scales_and_the_expanded_kv_cache(tiny):
    job, model = tiny
    from falcon_exp.quantization import weights_bytes

    # tied embeddings: the output head reads the whole table, so every weight byte counts
    assert roofline.weight_bytes_per_step(model) == weights_bytes(model)
    before = weights_bytes(model)
    with torch.no_grad():
        model(torch.tensor([PROMPTS[0]]))  # LLM.int8 moves its scales to the layer's state here
    assert weights_bytes(model) == before
    # Falcon's new decoder architecture caches keys and values expanded to all 8 heads of 32 (float32)
    assert roofline.kv_bytes_per_token(model, torch.tensor([PROMPTS[0]])) == 4 * 2 * 8 * 32 * 4
    untied = torch.nn.Module()
    embedding, head = torch.nn.Embedding(100, 8), torch.nn.Linear(8, 100, bias=False)
    untied.get_input_embeddings, untied.get_output_embeddings = (lambda: embedding), (lambda: head)
    untied.add_module("embedding", embedding), untied.add_module("head", head)
    assert roofline.weight_bytes_per_step(untied) == 100 * 8 * 4 + 8 * 4  # the head, and one embedding row


def test_roofline_fraction_by_hand():
    # 1 GB of weights, 1 kB of cache per token, 10 prompt tokens, 20 new: steps attend to 20 tokens on average
    step = roofline.step_bytes(10**9, 1000, 10, 20)
    assert step == 10**9 + 20_000
    assert roofline.fraction(step, bandwidth=2e12, ms_per_token=1.0) == pytest.approx(0.50001)


def test_copy_bandwidth_is_measured_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("FALCON_EXP_CACHE", str(tmp_path))
    first = roofline.copy_bandwidth("cpu")
    known = json.loads((tmp_path / "bandwidth.json").read_text())
    assert list(known.values()) == [first] and 1e8 < first < 1e13
    (tmp_path / "bandwidth.json").write_text(json.dumps({k: 123.0 for k in known}))
    assert roofline.copy_bandwidth("cpu") == 123.0  # read back, not measured again


def _host_built_tensors(step) -> list[str]:
    """Ops in `step` that make a tensor from host data, move one between devices or read a value
    back to the host: on a GPU each is a copy or a sync, which CUDA graph capture refuses."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    found = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if (
                any(op in name for op in ("lift_fresh", "_local_scalar_dense", "nonzero"))
                or (kwargs or {}).get("device") is not None and "_to_copy" in name
            ):
                where = [f for f in traceback.extract_stack() if "transformers" in f.filename or "falcon_exp" in f.filename]
                found.append(f"{name} at {where[-1].filename.split('/')[-1]}:{where[-1].lineno}")
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Spy():
        step()
    return found


@pytest.mark.parametrize("architecture", ["falcon-7b", "falcon-40b"])
def test_the_captured_decode_step_builds_no_tensor_on_the_host(architecture):
    """A CPU stand-in for capture on a GPU: both Falcon layouts (multi-query 7B, grouped 40B),
    shrunk; their list-indexed head split is the copy that made capture fail on an H200."""
    from transformers.models.falcon.modeling_falcon import FalconForCausalLM

    from falcon_exp.models import architecture_config
    from falcon_exp.quantization import quantizable_linears

    config = architecture_config(architecture)
    config.hidden_size, config.num_hidden_layers, config.vocab_size = 64 * 8, 2, 512
    config.num_attention_heads, config.num_kv_heads = 8, min(config.num_kv_heads, 2)
    torch.manual_seed(0)
    with quantizable_linears():
        model = FalconForCausalLM(config).eval()
    fast = FastDecoder(model, max_tokens=24, quantization=tiny_job("bits=16").quantization, device="cpu")
    expected = EagerDecoder(model, pad_token_id=2).generate(torch.tensor([PROMPTS[0]]), 12, True, lambda: None)
    assert fast.generate(torch.tensor([PROMPTS[0]]), 12, True, lambda: None) == expected
    with graph_safe_falcon():
        assert _host_built_tensors(fast._step) == []
        assert fast.generate(torch.tensor([PROMPTS[0]]), 12, True, lambda: None) == expected


def test_bitsandbytes_int8_cast_warning_is_logged_once(caplog):
    import logging

    import falcon_exp.quantization  # noqa: F401 - installs the filter

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    for message in ["MatMul8bitLt: cast A (test)"] * 3 + ["MatMul8bitLt: cast B (test)"]:
        logger.warning(message)
    assert [r.getMessage() for r in caplog.records] == ["MatMul8bitLt: cast A (test)", "MatMul8bitLt: cast B (test)"]

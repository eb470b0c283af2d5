"""The fast decoding path against transformers' generate, and the roofline's arithmetic."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import compose, resolve_job
from falcon_exp import roofline
from falcon_exp.decode import EagerDecoder, FastDecoder
from falcon_exp.errors import ConfigError
from falcon_exp.falcon_step import SHARED, falcon_for_decoding, share_reads
from falcon_exp.measure import timed_generate
from falcon_exp.models import load
from falcon_exp.records import Bandwidth

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46, 47]]


def tiny_job(*overrides: str):
    return compose("model=tiny-falcon", *overrides)


@pytest.fixture(scope="module", params=[16, 4, 8])
def tiny(request):
    """float32 activations: in bf16 a random model's near-tied logits round differently when the
    static cache's attention spans its padded length, which tests rounding, not the decoder."""
    job = resolve_job("model=tiny-falcon", f"bits={request.param}", "dtype=float32", "quantization.bitsandbytes.compute_dtype=float32",
                      "device=cpu")
    return job.config, load(job).model


@pytest.mark.parametrize("force_length", [True, False])
def test_fast_path_picks_the_same_tokens_as_generate(tiny, force_length):
    job, model = tiny
    fast = FastDecoder(model, max_tokens=8 + 24, config=job, device="cpu")
    eager = EagerDecoder(model, pad_token_id=2)
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        (expected,) = eager.generate(ids, 24, force_length, on_token=lambda: None)
        assert fast.generate(ids, 24, force_length, on_token=lambda: None) == [expected]
        if force_length:
            assert len(expected) == 24


@pytest.mark.slow
def test_the_compiled_decode_step_picks_the_same_tokens(tiny):
    """On a GPU the step is compiled before capture; compiled here, on the CPU, it must still
    pick generate's tokens (bf16, nf4 and int8 weights), and dynamo must really have compiled it."""
    from torch._dynamo.utils import counters

    job, model = tiny
    fast = FastDecoder(model, max_tokens=8 + 12, config=job, device="cpu")
    torch._dynamo.reset()
    counters.clear()
    fast._step = torch.compile(fast._step, dynamic=False)
    ids = torch.tensor([PROMPTS[2]])
    with falcon_for_decoding():
        assert fast.generate(ids, 12, True, lambda: None) == EagerDecoder(model, 2).generate(ids, 12, True, lambda: None)
    assert counters["stats"]["unique_graphs"] >= 1


def multi_query_falcon(bias: bool):
    """Falcon-7B's layout in miniature: 3 query heads against one cached key-value head, attention
    and MLP in parallel on one layer norm."""
    from transformers import FalconConfig, FalconForCausalLM

    from falcon_exp.quantization import quantizable_linears

    torch.manual_seed(0)
    config = FalconConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, multi_query=True,
                          new_decoder_architecture=False, parallel_attn=True, bias=bias, alibi=False, eos_token_id=2)
    with quantizable_linears():  # as the harness builds it
        return FalconForCausalLM(config).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_the_lean_falcon_step_gives_transformers_values_and_tokens(bias):
    """The fast path's one-token step of a multi-query Falcon (its weights joined where unbiased,
    its attention alone where not) gives transformers' logits, and the decoder its tokens, in a
    left-padded batch. Calls that reach transformers' attention are counted: prompts alone must."""
    from falcon_exp import falcon_step

    model = multi_query_falcon(bias)
    eager = EagerDecoder(model, pad_token_id=2)
    fast = FastDecoder(model, max_tokens=8 + 16, config=tiny_job(), device="cpu", batch=2)
    assert [SHARED in layer.__dict__ for layer in model.transformer.h] == [not bias] * 2
    one_token_calls = []
    transformers_attention = falcon_step._TRANSFORMERS_ATTENTION

    def counted(self, hidden_states, *args, **kwargs):
        one_token_calls.append(hidden_states.shape[1])
        return transformers_attention(self, hidden_states, *args, **kwargs)

    padded = torch.tensor([[2, 2, 2, 5, 6, 7, 8, 9], PROMPTS[2]])
    mask = (torch.arange(8) >= torch.tensor([[3], [0]])).long()

    def next_logits() -> torch.Tensor:
        with torch.no_grad():
            fast.cache.reset()
            fast._prefill(padded, mask)
            return fast._forward(fast.token, attention_mask=fast.mask, position_ids=fast.position, cache_position=fast.slot)

    falcon_step._TRANSFORMERS_ATTENTION = counted
    try:
        with falcon_for_decoding():
            ours = next_logits()
        theirs = next_logits()
        batch = fast.generate(padded, 16, True, lambda: None, attention_mask=mask)
        alone = FastDecoder(model, max_tokens=3 + 16, config=tiny_job(), device="cpu")
        (single,) = alone.generate(torch.tensor([PROMPTS[1]]), 16, True, lambda: None)
    finally:
        falcon_step._TRANSFORMERS_ATTENTION = transformers_attention
    assert set(one_token_calls) == {8, 3}  # the prompts alone went to transformers' attention
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert batch == [eager.generate(torch.tensor([PROMPTS[0]]), 16, True, lambda: None)[0],
                     eager.generate(torch.tensor([PROMPTS[2]]), 16, True, lambda: None)[0]]
    assert single == eager.generate(torch.tensor([PROMPTS[1]]), 16, True, lambda: None)[0]


def test_the_lean_step_leaves_transformers_falcon_as_it_was_after_an_error():
    from transformers.models.falcon.modeling_falcon import FalconAttention, FalconDecoderLayer

    before = FalconAttention._split_heads, FalconAttention.forward, FalconDecoderLayer.forward
    with pytest.raises(RuntimeError, match="inside"), falcon_for_decoding():
        assert FalconDecoderLayer.forward is not before[2] and FalconAttention.forward is not before[1]
        raise RuntimeError("inside")
    assert (FalconAttention._split_heads, FalconAttention.forward, FalconDecoderLayer.forward) == before


def test_joined_weights_add_no_memory_and_are_joined_once():
    from accelerate.hooks import ModelHook, add_hook_to_module

    from falcon_exp.quantization import weights_bytes

    model = multi_query_falcon(bias=False)
    placed = multi_query_falcon(bias=False)
    add_hook_to_module(placed.transformer.h[1].mlp.dense_4h_to_h, ModelHook())  # as accelerate places offloaded layers
    assert share_reads(placed) == 1 and SHARED not in placed.transformer.h[1].__dict__
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    held = weights_bytes(model)
    assert share_reads(model) == 2 and share_reads(model) == 0
    assert weights_bytes(model) == held
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    layer = model.transformer.h[0]
    into, out_of = layer.__dict__[SHARED]
    attention, mlp = layer.self_attention, layer.mlp
    assert attention.query_key_value.weight.data_ptr() == into.data_ptr()
    assert mlp.dense_h_to_4h.weight.untyped_storage().data_ptr() == into.untyped_storage().data_ptr()
    assert attention.dense.weight.data_ptr() == out_of.data_ptr()
    assert mlp.dense_4h_to_h.weight.untyped_storage().data_ptr() == out_of.untyped_storage().data_ptr()
    assert out_of.shape == (48, 48 + 4 * 48) and into.shape == (48 + 2 * 16 + 4 * 48, 48)
    # weights replaced since (a .to(), a loaded state dict): that layer is joined again, from them
    mlp.dense_h_to_4h.weight = torch.nn.Parameter(mlp.dense_h_to_4h.weight.detach() * 2)
    assert share_reads(model) == 1
    into = layer.__dict__[SHARED][0]
    assert torch.equal(into[attention.query_key_value.out_features :], before["transformer.h.0.mlp.dense_h_to_4h.weight"] * 2)
    assert mlp.dense_h_to_4h.weight.untyped_storage().data_ptr() == into.untyped_storage().data_ptr()


def test_fast_path_without_cuda_says_why_and_times_every_token(tiny):
    job, model = tiny
    fast = FastDecoder(model, max_tokens=32, config=job, device="cpu")
    assert fast.path == "static_cache" and "CUDA graphs need a CUDA device" in fast.fallback
    timing, (generated,) = timed_generate(fast, torch.tensor([PROMPTS[0]]), 10, True, "cpu")
    assert len(generated) == timing.new_tokens == 10 and timing.batch == 1
    assert 0 < timing.ttft_ms and timing.ttft_ms + 9 * timing.decode_ms_per_token <= timing.generate_s * 1e3 + 1e-6


def test_int8_with_outlier_threshold_names_why_it_cannot_be_graphed():
    job = tiny_job("bits=8", "quantization.bitsandbytes.int8_threshold=6.0")
    decoder = FastDecoder.__new__(FastDecoder)
    decoder.devices = {torch.device("cuda", 0)}
    assert "int8_threshold=6.0" in decoder._why_no_graph(job, "cuda")
    assert decoder._why_no_graph(tiny_job("bits=8", "quantization.bitsandbytes.int8_threshold=0"), "cuda") is None


def test_the_host_skips_reading_tokens_only_where_the_clock_follows_the_step():
    """A forced generation leaves its tokens on the device only when the clock's marks (on the
    current device's stream) come after each step: a model on the CPU, not one across devices."""
    decoder = FastDecoder.__new__(FastDecoder)
    decoder.devices = {torch.device("cpu")}
    assert decoder._marks_follow_steps()
    decoder.devices = {torch.device("cuda", 0), torch.device("cuda", 1)}
    assert not decoder._marks_follow_steps()


def test_generation_fast_is_validated():
    with pytest.raises(ConfigError, match="generation.fast='yes' is not allowed; choose true or false"):
        tiny_job("generation.fast=yes")
    assert tiny_job("generation.fast=true").generation.fast is True


def test_generation_compile_false_captures_the_plain_step_alone(tiny):
    job, model = tiny
    paths = {compile: [path for path, _, _ in FastDecoder(model, 16, tiny_job(f"generation.compile={compile}"), "cpu")._attempts()]
             for compile in ("true", "false")}
    assert paths == {"true": ["compiled_cuda_graph", "cuda_graph"], "false": ["cuda_graph"]}
    with pytest.raises(ConfigError, match="generation.compile='no' is not allowed; choose true or false"):
        tiny_job("generation.compile=no")


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


def test_roofline_fraction_by_hand(tiny):
    job, model = tiny
    eager = EagerDecoder(model, pad_token_id=2)
    # tiny-falcon caches 4 layers x (keys, values) x 8 heads x 32 dims in float32 per token
    assert eager.kv_bytes_per_token == 4 * 2 * 8 * 32 * 4
    # 10 prompt tokens, 20 new: decode step i (1..19) attends to 10 + i tokens, 20 on average
    assert eager.kv_bytes_per_step(10, 20) == 20 * 8192
    floor = roofline.floor_ms(10**9 + 20_000, 2e12)  # 1 GB of weights and 20 kB of cache at 2 TB/s
    assert floor == pytest.approx(0.50001) and roofline.fraction(floor, ms_per_token=1.0) == pytest.approx(0.50001)


def test_the_fast_path_reads_its_whole_static_cache_at_every_step(tiny):
    """Attention over a static cache runs over all its positions (the unused ones masked), so a
    short text in a long cache reads the whole cache: the floor must count that, not the text."""
    job, model = tiny
    fast = FastDecoder(model, max_tokens=64, config=job, device="cpu")
    fast.generate(torch.tensor([PROMPTS[1]]), 4, True, lambda: None)
    per_token = EagerDecoder(model, pad_token_id=2).kv_bytes_per_token
    assert fast.kv_bytes_per_token == per_token
    assert fast.kv_bytes_per_step(3, 4) == fast.kv_bytes_per_step(30, 30) == 64 * per_token


def test_bandwidth_is_measured_once_per_machine_read_and_copy(tmp_path, monkeypatch):
    """The read bandwidth is the fastest of the ways in READS, each kept; a cache made by other
    ways (or an earlier release's copy figure) is measured anew, never reused silently."""
    monkeypatch.setenv("FALCON_EXP_CACHE", str(tmp_path))
    first = roofline.bandwidth("cpu")
    (entry,) = json.loads((tmp_path / "bandwidth.json").read_text()).values()
    assert set(entry["readings"]) == set(roofline.READS) and entry["methods"] == roofline.METHODS
    assert first.read == max(first.readings.values()) == first.readings[first.read_method] and 1e8 < first.read < 1e13
    assert 1e8 < first.copy < 1e13
    cached = json.loads((tmp_path / "bandwidth.json").read_text())
    for entry in cached.values():
        entry |= {"read": 123.0, "copy": 456.0, "read_method": "reduction", "readings": {"reduction": 123.0}}
    (tmp_path / "bandwidth.json").write_text(json.dumps(cached))
    assert roofline.bandwidth("cpu") == Bandwidth(read=123.0, copy=456.0, read_method="reduction", readings={"reduction": 123.0})
    for entry in cached.values():
        entry["methods"] = "reduction"  # measured by this release's predecessor, the reduction alone
    (tmp_path / "bandwidth.json").write_text(json.dumps(cached))
    assert roofline.bandwidth("cpu").read != 123.0
    (tmp_path / "bandwidth.json").write_text(json.dumps({k: 789.0 for k in cached}))  # an earlier release's copy figure
    assert roofline.bandwidth("cpu").read != 789.0  # measured anew: that file had no read bandwidth


@pytest.mark.slow
def test_parallel_jobs_measure_the_bandwidth_once_and_never_read_a_half_written_file(tmp_path):
    """Three processes start together on an empty cache: one measures (the others would slow its
    measurement and theirs), the others wait and read its figures."""
    code = (
        "import logging, os, pathlib, sys, time\n"
        "from falcon_exp import roofline\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "go = pathlib.Path(sys.argv[1])\n"
        "(go.parent / f'ready-{os.getpid()}').touch()\n"
        "while not go.exists(): time.sleep(0.01)\n"
        "print(roofline.bandwidth('cpu'))\n"
    )
    go = tmp_path / "go"
    env = os.environ | {"FALCON_EXP_CACHE": str(tmp_path / "cache")}
    processes = [subprocess.Popen([sys.executable, "-c", code, str(go)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(3)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.monotonic() < deadline:  # each has imported torch, and waits
        time.sleep(0.05)
    go.touch()
    results = [p.communicate(timeout=120) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-500:] for _, err in results]
    assert sum(err.count("bandwidth of") for _, err in results) == 1
    assert len({out for out, _ in results}) == 1


def test_bitsandbytes_int8_cast_warning_is_logged_once(caplog):
    import logging

    from falcon_exp.console import quiet_third_party

    quiet_third_party()
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    for message in ["MatMul8bitLt: cast A (test)"] * 3 + ["MatMul8bitLt: cast B (test)"]:
        logger.warning(message)
    assert [r.getMessage() for r in caplog.records] == ["MatMul8bitLt: cast A (test)", "MatMul8bitLt: cast B (test)"]


def test_a_fraction_above_one_is_flagged_not_logged_silently(tiny):
    """Decoding faster than the floor allows means the floor's bytes or bandwidth are wrong."""
    from falcon_exp.quantization import inspect
    from falcon_exp.records import JobResult, Noise, Sample, Timing
    from falcon_exp.tracking import _tags_of

    job, model = tiny
    timing = Timing(prompt_tokens=5, new_tokens=8, generate_s=0.1, ttft_ms=10.0, decode_ms_per_token=1.0, e2e_tokens_per_s=80.0,
                    cpu_wait_share=0.0)
    samples = [Sample(0, r, "p", "o", timing, {}, floor, floor / 1.0) for r, floor in enumerate((0.8, 1.25))]
    result = JobResult(samples=samples, memory={}, unmeasured={}, report=inspect(model, job), load_s=1.0, device="cpu", quality={},
                       decode_path="eager", prepare_s=None, fast_fallback=None, inductor_options="", weight_bytes_per_step=1,
                       bandwidth=Bandwidth(read=1e9, copy=1e9, read_method="reduction", readings={}),
                       kv_bytes_per_token=1.0, warmup_tokens=0, backend_metrics={}, backend_tags={}, noise=Noise([], 0, None),
                       task_results=None)
    warning = _tags_of(result)["falcon_exp.roofline_warning"]
    assert "1 of 2 samples decode faster than the bandwidth floor allows (up to 1.250)" in warning
    assert "falcon_exp.roofline_warning" not in _tags_of(dataclasses.replace(result, samples=samples[:1]))
    assert "falcon_exp.inductor_options" not in _tags_of(result)  # inductor's defaults, or nothing compiled: no tag
    tuned = dataclasses.replace(result, decode_path="compiled_cuda_graph", inductor_options="coordinate_descent_tuning=True")
    assert _tags_of(tuned)["falcon_exp.inductor_options"] == "coordinate_descent_tuning=True"


def test_a_second_compile_of_the_same_step_loads_it_from_the_projects_compile_cache(tmp_path, monkeypatch):
    """generation.fast compiles each decoder's step afresh (dynamo reset); inductor's FX graph
    cache, kept under the project's cache in a folder of this torch and these GPUs, serves the
    second job's identical graph instead of compiling it again."""
    from torch._dynamo.utils import counters
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from falcon_exp import decode

    monkeypatch.setenv("FALCON_EXP_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what inductor writes there once it is used
    folder = decode.use_compile_cache()
    assert folder.parent == tmp_path / "compile" and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)

    def step(x):
        return torch.nn.functional.gelu(x * 3 + 1).sum(-1)

    x = torch.randn(4, 8)
    hits = []
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        torch.compile(step)(x)
        hits.append(counters["inductor"]["fxgraph_cache_hit"])
    assert hits == [0, 1] and any(folder.rglob("*"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert decode.use_compile_cache() == tmp_path / "mine"  # a user's own TORCHINDUCTOR_CACHE_DIR is kept

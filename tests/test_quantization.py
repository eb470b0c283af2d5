"""Real bitsandbytes layers and torchao weights on the CPU: the model that loads is the model that was asked for."""

from __future__ import annotations

import sys

import bitsandbytes as bnb
import pytest
import torch
from transformers.models.falcon.modeling_falcon import FalconForCausalLM, FalconLinear

from conftest import compose, load_config, resolve_job, save_tiny_falcon
from falcon_exp.config import JobConfig, knobs
from falcon_exp.errors import ConfigError
from falcon_exp.job import checkpoint_request, differences
from falcon_exp.quantization import QuantizationNotRealised, inspect, quantizable_linears, stored_tensors, verify, weights_bytes
from falcon_exp.weights import architecture_config, synthetic_state_dict


def ask(bits: int, backend: str = "bitsandbytes", **settings) -> JobConfig:
    """A tiny-Falcon job asking for these bits and the backend's settings, composed as on the command line."""
    return compose("model=tiny-falcon", f"bits={bits}", f"quantization.backend={backend}",
                   *(f"quantization.{backend}.{k}={v}" for k, v in settings.items()))


def load_falcon(quant: JobConfig, make_quantizable: bool = True, **shape):
    config = architecture_config("tiny-falcon")
    for key, value in shape.items():
        setattr(config, key, value)
    state = synthetic_state_dict(config, seed=0, dtype=torch.bfloat16, distinct=True)
    kwargs = dict(config=config, state_dict=state, quantization_config=load_config(quant), dtype=torch.bfloat16,
                  device_map="cpu")
    if make_quantizable:
        with quantizable_linears():
            return FalconForCausalLM.from_pretrained(None, **kwargs)
    return FalconForCausalLM.from_pretrained(None, **kwargs)


@pytest.mark.parametrize("bits, layer", [(4, bnb.nn.Linear4bit), (8, bnb.nn.Linear8bitLt)])
def test_every_falcon_linear_but_the_head_is_quantized(bits, layer):
    model = load_falcon(ask(bits))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 4 * 4 + 1  # four per layer, and the output head
    assert all(isinstance(m, layer) for n, m in linears.items() if n != "lm_head")
    assert not isinstance(linears["lm_head"], layer)
    report = verify(model, ask(bits), "cpu")
    assert report.quantized_layers == 16 and report.realised == f"{bits}bit"


def test_transformers_alone_leaves_falcon_unquantized_and_verify_refuses_it():
    """The silent failure of REFERENCE.md: FalconLinear is not exactly nn.Linear."""
    model = load_falcon(ask(4), make_quantizable=False)
    assert inspect(model, ask(4)).realised == "none"
    with pytest.raises(QuantizationNotRealised, match="layer asked Linear4bit, found FalconLinear in 16 of 16 linear layers"):
        verify(model, ask(4), "cpu")


def test_the_twin_class_is_restored_after_loading():
    with quantizable_linears():
        pass
    from transformers.models.falcon import modeling_falcon

    assert modeling_falcon.FalconLinear is FalconLinear


def test_weight_footprints_order_4_8_16_and_count_the_scales():
    sizes = {bits: inspect(load_falcon(ask(bits)), ask(bits)).weights_bytes for bits in (4, 8, 16)}
    assert sizes[4] < sizes[8] < sizes[16]
    linear_params = 4 * (256 * 384 + 256 * 256 + 2 * 256 * 1024)
    embedding = 49152 * 256 * 2
    norms = (4 * 2 + 1) * 2 * 256 * 2  # two per layer and the final one, weight and bias
    rotary = 2 * 16 * 4  # inv_freq and its original, fp32 buffers
    assert sizes[16] == embedding + linear_params * 2 + norms + rotary
    # int8 weights plus one fp32 scale per output row
    rows = 4 * (384 + 256 + 1024 + 256)
    assert sizes[8] == sizes[16] - linear_params * 2 + linear_params + rows * 4


def test_bnb_config_carries_every_knob():
    four = load_config(ask(4, quant_type="fp4", compute_dtype="float16", double_quant=True))
    assert (four.bnb_4bit_quant_type, four.bnb_4bit_compute_dtype, four.bnb_4bit_use_double_quant) == ("fp4", torch.float16, True)
    eight = load_config(ask(8, int8_threshold=0.0))
    assert eight.load_in_8bit and eight.llm_int8_threshold == 0.0


def test_verify_refuses_a_partly_quantized_model():
    model = load_falcon(ask(8))
    model.transformer.h[0].mlp.dense_h_to_4h = torch.nn.Linear(256, 1024)
    with pytest.raises(QuantizationNotRealised, match="layer asked Linear8bitLt, found Linear in 1 of 16 linear layers"):
        verify(model, ask(8), "cpu")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Pre-quantized checkpoints as users download them: nf4 with nested quantization, and
    LLM.int8 with an outlier threshold of 3."""
    root = tmp_path_factory.mktemp("prequantized")
    load_falcon(ask(4, double_quant=True)).save_pretrained(root / "nf4-double")
    load_falcon(ask(8, int8_threshold=3.0)).save_pretrained(root / "int8-t3")
    return root


def load_checkpoint(path, quant: JobConfig):
    from transformers import AutoModelForCausalLM

    with quantizable_linears():
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=load_config(quant), dtype=torch.bfloat16, device_map="cpu")


@pytest.mark.parametrize("checkpoint, asked, message", [
    ("nf4-double", ask(4, quant_type="fp4"), "quant_type asked fp4, found nf4 in 16 of 16 linear layers; also double_quant"),
    ("nf4-double", ask(4, double_quant=False), "double_quant asked False, found True in 16 of 16"),
    ("nf4-double", ask(4, double_quant=True, compute_dtype="float32"), "compute_dtype asked float32, found bfloat16"),
    ("int8-t3", ask(8), "int8_threshold asked 6.0, found 3.0 in 16 of 16"),
    ("int8-t3", ask(4), "layer asked Linear4bit, found Linear8bitLt"),
])
def test_a_checkpoints_own_quantization_is_found_layer_by_layer(saved, checkpoint, asked, message):
    """transformers loads a checkpoint's own quantization_config and ignores the request (with a
    warning only); verify compares what the layers hold with what was asked."""
    model = load_checkpoint(saved / checkpoint, asked)
    with pytest.raises(QuantizationNotRealised, match=message):
        verify(model, asked, "cpu")


def test_what_a_checkpoint_holds_passes_as_asked(saved):
    asked = ask(4, double_quant=True)
    assert verify(load_checkpoint(saved / "nf4-double", asked), asked, "cpu").realised == "4bit"
    asked = ask(8, int8_threshold=3.0)
    assert verify(load_checkpoint(saved / "int8-t3", asked), asked, "cpu").realised == "8bit"


def test_a_bitsandbytes_layer_holding_unquantized_weights_does_not_pass():
    """A Linear4bit whose weight was never quantized (no quant_state, bf16 storage) is a
    bitsandbytes class in name only."""
    model = load_falcon(ask(4))
    model.transformer.h[0].mlp.dense_h_to_4h = bnb.nn.Linear4bit(256, 1024, bias=False, compute_dtype=torch.bfloat16,
                                                                 quant_type="nf4")
    with pytest.raises(QuantizationNotRealised, match="weight dtype asked uint8, found float32 in 1 of 16"):
        verify(model, ask(4), "cpu")


def test_the_checkpoints_own_settings_are_read_as_a_request():
    asked = ask(4, quant_type="fp4")
    bits, four = checkpoint_request({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                     "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_use_double_quant": True}, "ckpt", asked.quantization)
    assert (bits, four.settings.quant_type, four.settings.compute_dtype, four.settings.double_quant) == (4, "nf4", "bfloat16", True)
    bits, eight = checkpoint_request({"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 3.0}, "ckpt",
                                        asked.quantization)
    assert (bits, eight.settings.int8_threshold) == (8, 3.0)
    assert differences(asked.knobs(), knobs(4, four)) == [
        "quantization.bitsandbytes.quant_type asked fp4, found nf4", "quantization.bitsandbytes.double_quant asked False, found True"]
    with pytest.raises(ConfigError, match="holds gptq weights"):
        checkpoint_request({"quant_method": "gptq", "bits": 4}, "ckpt", asked.quantization)


@pytest.mark.parametrize("planted", [0, 6])
def test_planted_outliers_send_llm_int8_down_its_outlier_path_and_only_then(planted):
    """Random weights never grow trained LLMs' activation outliers, so LLM.int8's decomposition
    never runs on tiny-falcon's; `model.synthetic_outliers` plants them (in the norms' gains), and then
    the int8 layers fed by the norms split exactly those hidden dims off to their fp16 path."""
    from conftest import resolve_job
    from falcon_exp.backends import bitsandbytes
    from falcon_exp.models import load
    from falcon_exp.weights import outlier_dims

    job = resolve_job("model=tiny-falcon", "bits=8", f"model.synthetic_outliers={planted}")
    model = load(job).model
    with torch.inference_mode():
        model(torch.tensor([[11, 200, 300, 400, 500]]))
    found = job.config.quantization.method.run_metrics(model, job.config)
    fed_by_norms = [m for n, m in model.named_modules() if n.endswith(("query_key_value", "dense_h_to_4h"))]
    assert fed_by_norms and all(isinstance(m, bnb.nn.Linear8bitLt) for m in fed_by_norms)
    if planted:
        dims = outlier_dims(model.config.hidden_size, planted, seed=0)
        assert all(sorted(m.state.idx.tolist()) == dims for m in fed_by_norms)
        assert found[bitsandbytes.INT8_OUTLIER_LAYERS] >= len(fed_by_norms) and found[bitsandbytes.INT8_OUTLIER_COLUMNS] > 0
    else:
        assert found == {bitsandbytes.INT8_OUTLIER_LAYERS: 0, bitsandbytes.INT8_OUTLIER_COLUMNS: 0.0}


def test_outliers_are_planted_only_in_synthetic_weights():
    with pytest.raises(ConfigError, match=r"model.synthetic_outliers=6 plants outliers in synthetic weights only; give model.weights=synthetic"):
        compose("bits=8", "model.synthetic_outliers=6")
    with pytest.raises(ConfigError, match=r"model.outlier_gain=0.5 is not allowed; it must be a number > 1"):
        compose("model=tiny-falcon", "model.outlier_gain=0.5")


def _stored_bytes_of_linears(model) -> int:
    return sum(t.numel() * t.element_size() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
               for t in stored_tensors(m.weight))


# torchao's schemes on the CPU: the overrides, the weight's tensor subclass, and the bytes one
# (rows x columns) weight stores: int4 two weights a byte and a bf16 scale and zero per group of
# 32; int8 a byte, a float32 scale and an int8 zero point per row; float8 a byte, a float32 scale.
TORCHAO_CPU = {
    "int4": (("bits=4", "quantization.torchao.group_size=32"), "Int4OpaqueTensor", lambda n, k: n * k // 2 + (k // 32) * n * 2 * 2),
    "int8": (("bits=8",), "Int8Tensor", lambda n, k: n * k + n * 4 + n),
    "float8": (("bits=8", "quantization.torchao.eight_bit=float8"), "Float8Tensor", lambda n, k: n * k + n * 4),
}


@pytest.mark.parametrize("scheme", TORCHAO_CPU)
def test_torchao_weights_are_verified_and_their_bytes_counted_from_what_they_store(scheme):
    """torchao keeps nn.Linear and swaps its weight for a tensor subclass whose numel() and dtype are
    the unquantized ones: counted naively, its weights would weigh what bf16 weighs."""
    from falcon_exp.models import load

    overrides, subclass, stored = TORCHAO_CPU[scheme]
    job = resolve_job("model=tiny-falcon", "quantization.backend=torchao", *overrides)
    loaded = load(job)
    linears = {n: m for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert {type(m.weight).__name__ for m in linears.values()} == {subclass}
    assert loaded.report.quantized_layers == 16 and loaded.report.realised == f"{job.config.bits}bit"
    assert _stored_bytes_of_linears(loaded.model) == sum(stored(*m.weight.shape) for m in linears.values())
    logical = sum(m.weight.numel() * 2 for m in linears.values())  # what numel() x element_size() would say
    others = sum(t.numel() * t.element_size() for n, t in [*loaded.model.named_parameters(), *loaded.model.named_buffers()]
                 if n.rsplit(".", 1)[0] not in linears)
    assert weights_bytes(loaded.model) == others + _stored_bytes_of_linears(loaded.model) < others + logical
    asked_otherwise = resolve_job("model=tiny-falcon", "quantization.backend=torchao", "bits=8",
                                  f"quantization.torchao.eight_bit={'int8' if scheme == 'float8' else 'float8'}").config
    with pytest.raises(QuantizationNotRealised, match=f"weight asked \\w+, found {subclass} in 16 of 16 linear layers"):
        verify(loaded.model, asked_otherwise, "cpu")


def test_an_int8_scale_shared_by_the_whole_tensor_is_not_taken_for_one_per_row():
    """torchao's Int8WeightOnlyConfig(PerTensor()) makes the same Int8Tensor, the same bytes but
    one scale: the 8-bit request (a scale per output row) must find the difference."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerTensor

    model = load_falcon(ask(16), make_quantizable=False)
    quantize_(model, Int8WeightOnlyConfig(granularity=PerTensor()), filter_fn=lambda m, n: isinstance(m, torch.nn.Linear) and n != "lm_head")
    with pytest.raises(QuantizationNotRealised, match=r"scale block asked \(1, \d+\), found \(\d+, \d+\) in 16 of 16 linear layers"):
        verify(model, ask(8, backend="torchao"), "cpu")


def test_a_group_size_that_does_not_divide_a_layer_leaves_it_unquantized_and_is_refused():
    """As Falcon-7B's width, 4544, and torchao's default group of 128: those layers stay bf16."""
    asked = ask(4, backend="torchao", group_size=64)
    model = load_falcon(asked, hidden_size=288)  # 288 = 4.5 groups of 64; the MLP's 1152 is 18
    with pytest.raises(QuantizationNotRealised, match="weight asked Int4OpaqueTensor, found Parameter in 12 of 16 linear layers; "
                                                      ".* quantization.torchao.group_size=64 does not divide its input width"):
        verify(model, asked, "cpu")


def test_what_the_config_alone_rules_out_for_torchao_is_refused_before_loading(tmp_path):
    """A group that does not divide a layer's input width (Falcon-7B's 4544 and 128), and torchao
    asked of a checkpoint that holds bitsandbytes weights: one line each, nothing loaded."""
    with pytest.raises(ConfigError, match="^quantization.torchao.group_size=128 does not divide falcon-7b-instruct's layer input width 4544 "
                                          ".* allowed here: 32, 64$"):
        resolve_job("model=falcon-7b-instruct", "model.weights=synthetic", "quantization.backend=torchao", "quantization.torchao.group_size=128")
    nf4 = save_tiny_falcon(tmp_path / "nf4", quantization=("model=tiny-falcon", "bits=4"))
    with pytest.raises(ConfigError, match="carries its own quantization_config.*: quantization.backend asked torchao, found bitsandbytes;"):
        resolve_job(f"model.path={nf4}", "bits=4", "quantization.backend=torchao")


def test_a_sweep_measures_what_repeats_an_earlier_job_once():
    """bf16 in a sweep over backends, or over 4-bit types, is one measurement; settings that apply differ."""
    from falcon_exp.sweep import repeated_jobs

    asked = [("bits=16",), ("bits=16", "quantization.backend=torchao"), ("bits=4",), ("bits=4", "quantization.backend=torchao"),
             ("bits=16", "quantization.bitsandbytes.quant_type=fp4"), ("bits=4", "quantization.bitsandbytes.quant_type=fp4")]
    jobs = [resolve_job("model=tiny-falcon", *overrides) for overrides in asked]
    assert repeated_jobs(jobs, [",".join(o) for o in asked]) == {"1": "bits=16", "4": "bits=16"}
    assert len({job.identity for job in jobs}) == len(jobs)  # identities (resume) stay as they were


def test_torchao_weight_only_8bit_compiles_its_batch_1_step_with_coordinate_descent():
    """Only int8 and float8 weight-only at batch 1 ask for it (the reduction that reads the 8-bit
    weight once). Whether the options reach the compile needs a GPU: the fast path compiles only
    there (the run's tag falcon_exp.inductor_options, experiments/README.md)."""
    def asked(*overrides: str) -> dict:
        config = compose("model=tiny-falcon", "quantization.backend=torchao", *overrides)
        return config.quantization.method.inductor_options(config)

    for eight_bit in ("int8", "float8"):
        assert asked("bits=8", f"quantization.torchao.eight_bit={eight_bit}") == {"coordinate_descent_tuning": True}
        assert asked("bits=8", f"quantization.torchao.eight_bit={eight_bit}", "batch_size=2", "max_length=null", "max_new_tokens=4",
                     "force_length=true") == {}
    assert asked("bits=8", "quantization.torchao.eight_bit=float8_dynamic") == asked("bits=4") == {}


def test_torchao_refuses_in_one_line_before_loading_when_absent_or_on_the_wrong_device(monkeypatch):
    with pytest.raises(ConfigError, match="^quantization.torchao.eight_bit=float8_dynamic needs a GPU of CUDA compute capability >= 8.9"):
        resolve_job("model=tiny-falcon", "quantization.backend=torchao", "bits=8", "quantization.torchao.eight_bit=float8_dynamic",
                    "device=cpu")
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if it were not installed
    missing = '^quantization.backend=torchao needs torchao, which is not installed: pip install "falcon-exp\\[torchao\\]"$'
    with pytest.raises(ConfigError, match=missing):
        resolve_job("model=tiny-falcon", "quantization.backend=torchao", "bits=4")
    assert resolve_job("model=tiny-falcon", "quantization.backend=torchao", "bits=16").config.mode == "bf16"  # nothing to quantize


# Identities that 0.2's code (commit 9480a50) gave these jobs: runs logged then must still be found
# by resume=true now that each backend's settings sit under its name.
IDENTITIES_OF_02 = {
    ("bits=4",): "02d648d2e80e1d20ae95c8c40fea2d37",
    ("bits=8",): "e8c80074313e35f9f20d6b3ff20cdd27",
    ("bits=16",): "f87ab73a3718fe21300e71c49d9482c9",
    ("quantization.backend=torchao",): "aa50a7a311b4107be6467799f53711b1",
    ("quantization.backend=torchao", "bits=8"): "b968f859727388366b26561dfa888b87",
    ("quantization.backend=torchao", "bits=16"): "63e6d9cc11aee28da5313f92ea14afaa",
    ("preset=article",): "9a534eef31399a81922256a2535d9aba",
    ("quantization.backend=torchao", "bits=8", "quantization.torchao.eight_bit=float8"): "e50c7c953e025d4f8854cd730faa1a31",
    ("bits=8", "quantization.bitsandbytes.int8_threshold=0"): "7083fe1b75276bb98b07b9817f89c3d1",
    # a torchao job beside bitsandbytes settings that are not the defaults: 0.2 hashed them as given
    ("preset=article", "quantization.backend=torchao"): "f4831d68c7cad579e4097ea2ef3a8e27",
    ("quantization.backend=torchao", "quantization.bitsandbytes.quant_type=fp4", "bits=8"): "4e2fe08c6cec3f98b228970bc1ca7907",
}


@pytest.mark.parametrize("overrides", IDENTITIES_OF_02)
def test_earlier_releases_jobs_keep_their_identities(overrides):
    """resume=true must still find runs logged by 0.1 (no backend setting), 0.2 (every backend's
    settings flat in `quantization`) and before the noise and corpus settings (left at their defaults)."""
    assert resolve_job("model=tiny-falcon", *overrides).identity == IDENTITIES_OF_02[overrides]


def test_a_setting_that_applies_changes_the_identity():
    job = resolve_job("model=tiny-falcon", "bits=4")
    assert resolve_job("model=tiny-falcon", "bits=4", "quantization.backend=torchao").identity != job.identity
    assert resolve_job("model=tiny-falcon", "bits=4", "noise.reruns=3").identity != job.identity
    assert resolve_job("model=tiny-falcon", "bits=4", "quantization.backend=hqq").identity != job.identity
    hqq = resolve_job("model=tiny-falcon", "bits=4", "quantization.backend=hqq", "quantization.hqq.group_size=32")
    assert hqq.identity != resolve_job("model=tiny-falcon", "bits=4", "quantization.backend=hqq").identity


def test_the_first_load_freezes_what_was_alive_and_later_models_are_still_freed():
    """The model cache moves what lives before its first model (the imported stack) out of the
    collector's sight, once; a model loaded after that is freed when the cache lets it go."""
    import gc
    import weakref

    from falcon_exp.models import ModelCache

    cache, before = ModelCache(), gc.get_freeze_count()
    try:
        loaded, reused = cache.get(resolve_job("model=tiny-falcon", "bits=16", "device=cpu"))
        frozen = gc.get_freeze_count()
        assert not reused and frozen > before
        model = weakref.ref(loaded.model)
        del loaded
        cache.get(resolve_job("model=tiny-falcon", "bits=4", "device=cpu"))  # lets the first go: freed, nothing frozen anew
        assert model() is None and gc.get_freeze_count() <= frozen  # frozen objects still go when nothing refers to them
    finally:
        cache.clear()
        gc.unfreeze()  # this process's objects go back to the collector

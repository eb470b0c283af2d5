"""The Marlin backend's format and layers on the CPU: GPTQ's symmetric codes, their packing and
scales, the padding Marlin's tiles need, real layers in a tiny Falcon verified and counted, and
what a GPU job without the kernel is told before any model loads. (The kernel itself runs on a
GPU only: experiments/benchmarks/marlin_gemvs.py checks it against these dequantized weights.)"""

from __future__ import annotations

import pytest
import torch

from conftest import resolve_job
from falcon_exp.backends import marlin_kernel as marlin
from falcon_exp.errors import ConfigError
from falcon_exp.quantization import QuantizationNotRealised, verify, weights_bytes


@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 128), (8, -1)])
def test_codes_are_gptqs_symmetric_rounding_and_pack_the_first_code_lowest(bits, group_size):
    torch.manual_seed(0)
    weight = torch.randn(64, 256) * 0.02
    weight[3] = 0  # a row of zeros: GPTQ's scale 1, its codes the bias
    codes, scales = marlin.quantize(weight, bits, group_size)
    group = 256 if group_size == -1 else group_size
    assert scales.shape == (256 // group, 64) and scales.dtype == torch.bfloat16
    peak = weight.reshape(64, -1, group).abs().amax(-1).t()
    assert torch.equal(scales[:, 3], torch.ones(256 // group, dtype=torch.bfloat16))
    assert torch.equal(scales.float()[:, peak[0] > 0], (2 * peak / (2**bits - 1)).to(torch.bfloat16).float()[:, peak[0] > 0])
    assert codes.min() >= 0 and codes.max() == 2**bits - 1 and (codes[3] == 2 ** (bits - 1)).all()
    packed = marlin.pack(codes, bits)
    assert packed.shape == (256 * bits // 32, 64) and packed.dtype == torch.int32
    assert torch.equal(marlin.unpack(packed, bits), codes.t().int())
    weights = marlin.dequantize(packed, scales, bits).t()  # (code - bias) * scale, in float32
    step = scales.t().float().repeat_interleave(group, dim=1)
    assert torch.equal(weights, (codes.float() - 2 ** (bits - 1)) * step)
    assert ((weights - weight).abs() <= step / 2 + 1e-6).sum() > 0.99 * weight.numel() and (weights[3] == 0).all()
    assert torch.equal(marlin.dequantize(packed, scales, bits, torch.bfloat16), weights.t().bfloat16())  # one rounding
    one_row = torch.arange(32 // bits, dtype=torch.int16)[None, :] % 2**bits
    assert marlin.pack(one_row, bits).item() == sum(int(c) << (bits * i) for i, c in enumerate(one_row[0]))


def test_shapes_are_padded_to_marlins_tiles_and_whole_groups():
    """Falcon-7B: the 4544-wide inputs pad to 4608 for groups of 128; 40B's widths fit as they are."""
    assert marlin.padded_shape(4672, 4544, 128) == (4672, 4608)
    assert marlin.padded_shape(4544, 4544, 64) == (4544, 4608)  # 4544 rows are no multiple of 128
    assert marlin.padded_shape(18176, 4544, 64) == (18176, 4544)
    assert marlin.padded_shape(4544, 18176, -1) == (4544, 18176)
    assert marlin.padded_shape(9216, 8192, 128) == (9216, 8192)


def test_a_layer_padded_to_the_tiles_computes_its_own_width_and_bias():
    """100 inputs and 72 outputs pad to 128 x 128: the input is zero-padded, the output cut back."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(100, 72, bias=True)
    layer = marlin.MarlinLinear(linear, 4, 32)
    assert (layer.padded_rows, layer.padded_columns) == (128, 128) and layer.layout == marlin.GPTQ_LAYOUT
    x = torch.randn(2, 3, 100)
    weight = marlin.dequantize(layer.qweight, layer.scales, 4)[:100, :72]
    out = layer(x)
    assert out.shape == (2, 3, 72) and out.is_contiguous()
    assert torch.allclose(out, x @ weight + linear.bias.detach(), atol=1e-5)
    assert (weight - linear.weight.detach().t()).abs().max() < 0.1 * linear.weight.abs().max()


def test_every_linear_but_the_head_is_marlins_and_its_bytes_are_what_it_stores():
    from falcon_exp.models import load

    job = resolve_job("model=tiny-falcon", "quantization.backend=marlin", "bits=4", "quantization.marlin.group_size=64", "device=cpu")
    loaded = load(job)
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, marlin.MarlinLinear)}
    assert len(layers) == 16 and type(loaded.model.lm_head) is torch.nn.Linear
    assert loaded.report.quantized_layers == 16 and loaded.report.realised == "4bit"
    held = sum(marlin.layout_bytes(m.padded_rows, m.padded_columns, 4, 64) for m in layers.values())
    assert held == sum(m.qweight.numel() * 4 + m.scales.numel() * 2 for m in layers.values())
    others = sum(t.numel() * t.element_size() for n, t in [*loaded.model.named_parameters(), *loaded.model.named_buffers()]
                 if n.rsplit(".", 1)[0] not in layers)
    assert weights_bytes(loaded.model) == loaded.report.weights_bytes == others + held
    layer = loaded.model.transformer.h[0].mlp.dense_4h_to_h
    x = torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16)
    weight = marlin.dequantize(layer.qweight, layer.scales, 4)[: layer.in_features, : layer.out_features]
    assert torch.allclose(layer(x).float(), x.float() @ weight, rtol=2e-2, atol=2e-2)


def test_a_layer_quantized_otherwise_or_left_as_it_was_is_refused():
    from falcon_exp.models import load

    job = resolve_job("model=tiny-falcon", "quantization.backend=marlin", "bits=8", "device=cpu")
    model = load(job).model
    with pytest.raises(QuantizationNotRealised, match="bits asked 4, found 8 in 16 of 16 linear layers"):
        verify(model, resolve_job("model=tiny-falcon", "quantization.backend=marlin", "bits=4", "device=cpu").config, "cpu")
    model.transformer.h[0].mlp.dense_4h_to_h = torch.nn.Linear(1024, 256, bias=False, dtype=torch.bfloat16)
    with pytest.raises(QuantizationNotRealised, match="layer asked MarlinLinear, found Linear in 1 of 16 linear layers"):
        verify(model, job.config, "cpu")


def test_a_gpu_job_without_the_kernel_is_told_how_to_get_it_before_loading(monkeypatch):
    """gptqmodel absent and no library named; its build failing; a named library that does not load; not bfloat16."""
    import sys
    import types

    job = resolve_job("model=tiny-falcon", "quantization.backend=marlin", "bits=4")
    method = job.config.quantization.method
    monkeypatch.setitem(sys.modules, "gptqmodel", None)
    monkeypatch.delenv(marlin.LIBRARY_ENV, raising=False)
    monkeypatch.setattr(marlin, "_source", None)
    with pytest.raises(ConfigError, match=f"^quantization.backend=marlin on a GPU needs the Marlin kernel: {marlin.LIBRARY_ENV}=PATH "
                                          "of a library built by experiments/gpu/build_marlin.py, or gptqmodel>=7.7 installed$"):
        method.check(job.config, "cuda", job.weights)
    failing = types.ModuleType("gptqmodel.utils.marlin")  # gptqmodel cannot install here (it needs torch >= 2.14.1)
    failing.prewarm_marlin_extension = lambda dtype: (_ for _ in ()).throw(RuntimeError("Marlin JIT build failed: no nvcc\ndetails"))
    monkeypatch.setitem(sys.modules, "gptqmodel.utils.marlin", failing)
    with pytest.raises(ConfigError, match="^gptqmodel's build does not load as the Marlin library: Marlin JIT build failed: no nvcc$"):
        method.check(job.config, "cuda", job.weights)
    monkeypatch.setenv(marlin.LIBRARY_ENV, "/nowhere/marlin.so")
    with pytest.raises(ConfigError, match=f"^{marlin.LIBRARY_ENV}=/nowhere/marlin.so does not load as the Marlin library: "):
        method.check(job.config, "cuda", job.weights)
    float32 = resolve_job("model=tiny-falcon", "quantization.backend=marlin", "bits=4", "dtype=float32")
    with pytest.raises(ConfigError, match=r"^quantization.backend=marlin computes in bfloat16 on a GPU \(dtype=float32\); "):
        method.check(float32.config, "cuda", float32.weights)
    method.check(float32.config, "cpu", float32.weights)  # the CPU's dequantized matmul takes any dtype

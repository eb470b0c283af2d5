"""HQQ's real layers on the CPU: quantized after loading, verified layer by layer, and their bytes
counted from what they store (packed weights, and the scales and zero points in their `meta`)."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import resolve_job
from falcon_exp.errors import ConfigError
from falcon_exp.quantization import QuantizationNotRealised, verify, weights_bytes


def _hqq_job(*overrides: str):
    return resolve_job("model=tiny-falcon", "quantization.backend=hqq", *overrides)


@pytest.mark.parametrize("bits, axis", [(4, 1), (8, 0)])
def test_every_linear_but_the_head_is_hqqs_and_its_bytes_are_what_it_stores(bits, axis):
    from hqq.core.quantize import HQQLinear

    from falcon_exp.models import load

    job = _hqq_job(f"bits={bits}", f"quantization.hqq.axis={axis}", "quantization.hqq.group_size=32")
    loaded = load(job)
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, HQQLinear)}
    assert len(layers) == 16 and isinstance(loaded.model.lm_head, torch.nn.Linear)
    assert loaded.report.quantized_layers == 16 and loaded.report.realised == f"{bits}bit"
    packed = sum(m.W_q.numel() for m in layers.values())  # uint8: two 4-bit weights a byte, or one 8-bit
    shapes = [tuple(m.meta["shape"]) for m in layers.values()]
    assert packed == sum(rows * columns * bits // 8 for rows, columns in shapes)
    groups = sum(rows * columns // 32 for rows, columns in shapes)
    scales_and_zeros = sum(m.meta[k].numel() * m.meta[k].element_size() for m in layers.values() for k in ("scale", "zero"))
    assert scales_and_zeros == groups * 2 * 2  # a bf16 scale and a bf16 zero point per group of 32
    others = sum(t.numel() * t.element_size() for n, t in [*loaded.model.named_parameters(), *loaded.model.named_buffers()]
                 if n.rsplit(".", 1)[0] not in layers)
    assert weights_bytes(loaded.model) == loaded.report.weights_bytes == others + packed + scales_and_zeros
    with torch.inference_mode():  # the quantized layers compute: near the unquantized output head's input
        assert torch.isfinite(loaded.model(torch.tensor([[11, 200, 300]])).logits).all()


def test_a_layer_left_as_it_was_or_quantized_otherwise_is_refused():
    from falcon_exp.models import load

    job = _hqq_job("bits=4")
    model = load(job).model
    with pytest.raises(QuantizationNotRealised, match="bits asked 8, found 4 in 16 of 16 linear layers"):
        verify(model, _hqq_job("bits=8").config, "cpu")
    with pytest.raises(QuantizationNotRealised, match="group_size asked 32, found 64 in 16 of 16"):
        verify(model, _hqq_job("bits=4", "quantization.hqq.group_size=32").config, "cpu")
    model.transformer.h[0].mlp.dense_4h_to_h = torch.nn.Linear(1024, 256, bias=False, dtype=torch.bfloat16)
    with pytest.raises(QuantizationNotRealised, match="layer asked HQQLinear, found Linear in 1 of 16 linear layers"):
        verify(model, job.config, "cpu")


def test_what_hqq_cannot_honour_is_refused_in_one_line_before_loading(monkeypatch):
    """Falcon-7B's width 4544 is 35.5 groups of 128; hqq absent says how to install it."""
    with pytest.raises(ConfigError, match="^quantization.hqq.group_size=128 does not divide falcon-7b-instruct's layer input width "
                                          "4544 .* allowed here: 32, 64$"):
        resolve_job("model=falcon-7b-instruct", "model.weights=synthetic", "quantization.backend=hqq", "quantization.hqq.group_size=128")
    monkeypatch.setitem(sys.modules, "hqq", None)  # as if it were not installed
    with pytest.raises(ConfigError, match='^quantization.backend=hqq needs hqq, which is not installed: pip install "falcon-exp\\[hqq\\]"$'):
        _hqq_job("bits=4")


def test_tinygemm_conversion_reads_torchs_version_as_hqq_expects_and_restores_it():
    """hqq 0.2.8 reads torch "2.11" as 2.1 and would skip the packing tinygemm needs."""
    from falcon_exp.backends.hqq import _version_read_as

    before = torch.__version__
    with _version_read_as("2.5"):
        assert float(torch.__version__[:3]) >= 2.5 and torch.__version__ == before
    assert torch.__version__ is before

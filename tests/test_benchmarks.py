"""The benchmark scripts whose printouts back committed GPU results, run on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", ["bitsandbytes", "hqq"])
def test_the_matmuls_alone_are_every_linear_layer_and_the_bytes_they_hold(backend):
    """The step's matmuls, timed alone, call every linear layer and count all it holds (nf4 and
    hqq's 4-bit: packed weights with their scales): the model's bytes less those of the norms and buffers."""
    from conftest import resolve_job
    from falcon_exp.models import load
    from falcon_exp.quantization import weights_bytes

    job = resolve_job("model=tiny-falcon", "bits=4", f"quantization.backend={backend}")
    model = load(job).model
    calls = []
    linears = [m for _, m in job.config.quantization.method.layers(model)]
    for module in linears:
        module.register_forward_hook(lambda m, i, o: calls.append(m))
    ms, held = _script("decode").matmuls_alone(model, "cpu", job.config)
    assert ms > 0 and set(map(id, calls)) == set(map(id, linears)) and len(calls) % len(linears) == 0
    in_linears = {t.data_ptr() for m in linears for t in m.parameters()}  # tiny-falcon's head is its embedding
    outside = sum(t.numel() * t.element_size() for m in model.modules() if not any(m is layer for layer in linears)
                  for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)] if t.data_ptr() not in in_linears)
    assert held == weights_bytes(model) - outside


def test_the_matmuls_alone_read_falcon_7bs_joined_matrices_as_the_lean_step_does():
    """Once the fast path has joined a layer's four matrices into two, the matmuls alone read
    those two (the step's reads), and the same bytes as before the join."""
    from test_decode import multi_query_falcon

    from conftest import compose
    from falcon_exp.decode import FastDecoder

    model, config = multi_query_falcon(bias=False), compose("model=tiny-falcon")
    matmuls_alone = _script("decode").matmuls_alone
    _, apart = matmuls_alone(model, "cpu", config)
    FastDecoder(model, 16, config, "cpu")
    calls = []
    for layer in model.transformer.h:
        layer.mlp.dense_h_to_4h.register_forward_hook(lambda m, i, o: calls.append(m))
    _, joined = matmuls_alone(model, "cpu", config)
    assert joined == apart and not calls  # the joined matrices were read, not the layers' views


@pytest.mark.parametrize("planted", [0, 6])
def test_outlier_columns_are_the_planted_dims_in_the_layers_fed_by_the_norms(planted):
    seen = _script("outlier_columns").columns_past("tiny-falcon", layers=2, outliers=planted, tokens=12, threshold=6.0)
    fed_by_norms = [n for n in seen if n.endswith(("query_key_value", "dense_h_to_4h"))]
    assert len(fed_by_norms) == 4
    assert {n: seen[n][1] for n in fed_by_norms} == dict.fromkeys(fed_by_norms, planted)
    assert all(columns == 0 for n, (_, columns, _) in seen.items() if n not in fed_by_norms)

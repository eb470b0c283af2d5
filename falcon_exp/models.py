"""Loading a job's weights as asked, and holding one loaded model per process.

Every source ends in the same `from_pretrained(..., quantization_config=...)` call (and, for a
method transformers cannot load with, its backend's quantizing step), so memory and time are those
of the real loading path; `verify` then refuses a model whose layers are not what
was asked. Synthetic weights share one random tensor per layer position on the host (40B needs
neither 80 GB of disk nor of host memory), and each layer is still its own tensor on the device.
"""

from __future__ import annotations

import ctypes
import gc
import time
from dataclasses import dataclass

import torch

from falcon_exp.console import log
from falcon_exp.job import Job
from falcon_exp.measure import synchronize
from falcon_exp.quantization import quantizable_linears, verify
from falcon_exp.records import QuantizationReport
from falcon_exp.weights import architecture_config, synthetic_state_dict


@dataclass
class LoadedModel:
    model: torch.nn.Module
    report: QuantizationReport
    load_s: float


def load(job: Job) -> LoadedModel:
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config, weights, device = job.config, job.weights, job.device
    dtype = getattr(torch, config.dtype)
    kwargs = dict(dtype=dtype, device_map="auto" if device == "cuda" else "cpu", max_memory=config.max_memory)
    method = config.quantization.method if config.bits != 16 else None
    if method and not weights.prequantized:  # such a checkpoint loads by its own quantization_config, checked against the job's
        kwargs["quantization_config"] = method.load_config(config, device)
    if weights.kind == "synthetic":
        architecture = architecture_config(weights.architecture)
        state = synthetic_state_dict(architecture, weights.seed, dtype, distinct=device == "cpu", outliers=weights.outliers)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(architecture)]
        source, kwargs = None, kwargs | {"config": architecture, "state_dict": state}
    else:
        model_class, source = AutoModelForCausalLM, weights.source
    log.info(f"loading {config.model.name} ({weights.kind} weights) as {config.mode} on {device}")
    synchronize(device)
    start = time.perf_counter()
    with quantizable_linears():
        model = model_class.from_pretrained(source, **kwargs)
    if method and not weights.prequantized:
        method.quantize(model, config, device)  # methods transformers cannot load with quantize here
        gc.collect()
        if device == "cuda":  # the unquantized weights it replaced: not the generation's reserve
            torch.cuda.empty_cache()
    synchronize(device)
    load_s = time.perf_counter() - start
    model.eval()
    gc.collect()
    _return_freed_host_memory()  # what quantizing on load freed (the 16-bit source tensors) is not the generation's
    return LoadedModel(model=model, report=verify(model, config, device), load_s=load_s)


class ModelCache:
    """One loaded model per process, reused while the job's `model_key` (weights, quantization
    settings, dtype, device, memory caps) stays the same."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._loaded: LoadedModel | None = None
        self._frozen = False

    def get(self, job: Job) -> tuple[LoadedModel, bool]:
        """The job's model, and whether it was reused (True) or loaded by this call (False)."""
        if self._loaded is not None and self._key == job.model_key:
            return self._loaded, True
        self.clear()
        if not self._frozen:
            # What is alive before the first model (the imported stack: some 600,000 objects) lives
            # as long as the process; out of the collector's sight, each collection that frees a
            # model scans what came after it, milliseconds instead of a quarter second.
            gc.freeze()
            self._frozen = True
        self._loaded, self._key = load(job), job.model_key
        return self._loaded, False

    def clear(self) -> None:
        """Free the held model (and its GPU memory) before another loads or after a failure."""
        self._key, self._loaded = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _return_freed_host_memory()


def _return_freed_host_memory() -> None:
    """glibc keeps freed heap pages; without this, a generation's peak resident memory would
    include what loading freed, or the last model (the quality reference's, say)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


MODELS = ModelCache()

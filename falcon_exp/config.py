"""The typed, validated form of one job's configuration.

Hydra composes plain YAML (conf/); `JobConfig.from_hydra` turns it into frozen dataclasses and
rejects bad input with one line naming the bad value and the allowed ones, before any model,
tokenizer or tracking run exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BITS = (4, 8, 16)
WEIGHTS = ("packaged", "hub", "synthetic")
QUANT_TYPES = ("nf4", "fp4")
DTYPES = ("bfloat16", "float16", "float32")
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DEVICES = ("auto", "cpu", "cuda")
ARCHITECTURES_DIR = Path(__file__).parent / "architectures"
CONF_DIR = Path(__file__).resolve().parent / "conf"  # inside the package: a wheel carries it


class FalconExpError(Exception):
    """An error the user can fix; printed as one line, without a traceback."""


class ConfigError(FalconExpError):
    """Bad input, found before anything was loaded or logged."""


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        choices = ", ".join(str(a) for a in allowed)
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {choices}")


def _positive_int(key: str, value: Any, minimum: int = 1, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} is not allowed; it must be an integer >= {minimum}")


def group_choices(group: str, config_dirs: tuple[Path, ...] = ()) -> list[str]:
    """The options of a config group: the package's own and those in the user's config dirs."""
    return sorted({p.stem for root in (CONF_DIR, *config_dirs) for p in (root / group).glob("*.y*ml")})


def override_key(argument: str) -> str:
    """`+quantization.quant_type=nf4` -> `quantization.quant_type`."""
    return argument.lstrip("+~").partition("=")[0]


def user_config_dirs(arguments: list[str]) -> tuple[Path, ...]:
    """Config folders a user adds with Hydra's usual means: `--config-dir DIR` (`-cd DIR`) and
    `hydra.searchpath=[file://DIR, pkg://PACKAGE.PATH]`."""
    dirs: list[Path] = []
    for i, argument in enumerate(arguments):
        if argument in ("--config-dir", "-cd") and i + 1 < len(arguments):
            dirs.append(Path(arguments[i + 1]))
        elif argument.startswith("--config-dir="):
            dirs.append(Path(argument.partition("=")[2]))
        elif override_key(argument) == "hydra.searchpath":
            for entry in argument.partition("=")[2].strip("[]").split(","):
                entry = entry.strip().strip("'\"")
                if entry.startswith("pkg://"):
                    from importlib.resources import files

                    package, _, sub = entry.removeprefix("pkg://").partition("/")
                    dirs.append(Path(str(files(package))) / sub)
                elif entry:
                    dirs.append(Path(entry.removeprefix("file://")))
    return tuple(dirs)


def check_group_overrides(arguments: list[str]) -> None:
    """`model=nope` on the command line: one line naming the choices, before Hydra composes
    (whose own message spans a screen)."""
    config_dirs = user_config_dirs(arguments)
    for argument in arguments:
        key, value = override_key(argument), argument.partition("=")[2]
        if key not in ("model", "prompts", "experiment") or not value:
            continue
        allowed = group_choices(key, config_dirs)
        for choice in value.split(","):
            if choice not in allowed and choice != "null":
                raise ConfigError(f"{key}={choice!r} is not allowed; choose one of: {', '.join(allowed)}")


# Keys that decide which weights load; a sweep varies them slowest so that each model loads once.
LOAD_SHAPING = ("model", "experiment", "bits", "quantization", "dtype", "device", "max_memory", "seed")


def load_order(arguments: list[str]) -> list[str]:
    """Command-line overrides with the load-shaping ones first (otherwise in the order given).

    Hydra's sweeper varies the first override slowest, so `-m max_length=40,48 bits=4,8` would
    reload the model for every job; after this, jobs that share weights run back to back and
    the process's model cache (models.MODELS) loads each model once. Reordering overrides of
    different keys changes no job's configuration."""

    slots = [i for i, a in enumerate(arguments) if "=" in a and not a.startswith("-")]  # flags stay put
    overrides = sorted((arguments[i] for i in slots), key=lambda a: override_key(a).split(".")[0] not in LOAD_SHAPING)
    ordered = list(arguments)
    for slot, override in zip(slots, overrides):
        ordered[slot] = override
    return ordered


def available_architectures() -> list[str]:
    return sorted(p.stem for p in ARCHITECTURES_DIR.glob("*.json"))


@dataclass(frozen=True)
class ModelConfig:
    name: str
    weights: str
    path: str | None = None
    architecture: str | None = None
    chat_template: bool = False

    def __post_init__(self) -> None:
        _one_of("model.weights", self.weights, WEIGHTS)
        if self.weights == "synthetic":
            _one_of("model.architecture", self.architecture, tuple(available_architectures()))
        if self.weights == "hub" and not self.path:
            raise ConfigError(f"model.weights=hub needs model.path (a hub id or a local directory); model={self.name}")

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        raw = dict(raw)
        if raw.get("path") and raw.get("weights") == "packaged":
            # A path given on the command line names other weights than the packaged default.
            raw["weights"] = "hub"
            raw["name"] = Path(str(raw["path"]).rstrip("/")).name
            raw["chat_template"] = True
        return cls(**raw)


@dataclass(frozen=True)
class QuantizationConfig:
    bits: int
    quant_type: str = "nf4"
    compute_dtype: str = "bfloat16"
    double_quant: bool = False
    int8_threshold: float = 6.0
    from_checkpoint: bool = False  # take bits and knobs from the checkpoint's own quantization_config

    def __post_init__(self) -> None:
        _one_of("bits", self.bits, BITS)
        _one_of("quantization.quant_type", self.quant_type, QUANT_TYPES)
        _one_of("quantization.compute_dtype", self.compute_dtype, DTYPES)
        if not isinstance(self.double_quant, bool):
            raise ConfigError(f"quantization.double_quant={self.double_quant!r} is not allowed; choose true or false")
        if isinstance(self.int8_threshold, bool) or not isinstance(self.int8_threshold, (int, float)) or self.int8_threshold < 0:
            raise ConfigError(f"quantization.int8_threshold={self.int8_threshold!r} is not allowed; it must be a number >= 0")
        if not isinstance(self.from_checkpoint, bool):
            raise ConfigError(f"quantization.from_checkpoint={self.from_checkpoint!r} is not allowed; choose true or false")

    def knobs(self) -> dict[str, Any]:
        """The settings that apply at these bits, by their config key (bits first)."""
        applying = {4: ("quant_type", "compute_dtype", "double_quant"), 8: ("int8_threshold",)}.get(self.bits, ())
        return {"bits": self.bits} | {f"quantization.{k}": getattr(self, k) for k in applying}

    @property
    def load_key(self) -> tuple:
        """The knobs that shape the loaded weights: int8 ignores the 4-bit ones and vice versa."""
        if self.bits == 4:
            return (4, self.quant_type, self.compute_dtype, self.double_quant)
        return (8, float(self.int8_threshold)) if self.bits == 8 else (16,)

    @property
    def mode(self) -> str:
        """nf4, fp4 or int8; None for the unquantized baseline."""
        return {4: self.quant_type, 8: "int8"}.get(self.bits)


@dataclass(frozen=True)
class Prompts:
    name: str
    items: tuple[str, ...]
    file: str | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> Prompts:
        file = raw.get("file")
        if file:
            return cls(name=Path(file).stem, items=tuple(read_prompts_file(Path(file))), file=str(file))
        items = raw.get("items") or []
        if not items:
            raise ConfigError(f"prompts={raw.get('name')!r} holds no prompts; give at least one (prompts.items or prompts.file)")
        return cls(name=raw["name"], items=tuple(_check_prompt(p, f"prompts.items[{i}]") for i, p in enumerate(items)))


def _check_prompt(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}={value!r} is not a prompt; each prompt must be a non-empty string")
    return value


def read_prompts_file(path: Path) -> list[str]:
    """A YAML list of strings (or {prompts: [...]}), or JSON lines with a "prompt" field; data only."""
    if not path.is_file():
        raise ConfigError(f"prompts.file={str(path)!r} does not exist; give a .yaml, .yml or .jsonl file of prompts")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            items = [row.get("prompt") if isinstance(row, dict) else None for row in rows]
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
            items = data.get("prompts") if isinstance(data, dict) else data
        else:
            raise ConfigError(f"prompts.file={str(path)!r} has an unknown suffix; allowed: .yaml, .yml, .jsonl")
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"prompts.file={str(path)!r} is malformed: {str(error).splitlines()[0]}") from None
    if not isinstance(items, list) or not items:
        raise ConfigError(
            f"prompts.file={str(path)!r} holds no prompts; write a YAML list of strings or JSON lines with a \"prompt\" field"
        )
    return [_check_prompt(p, f"prompts.file={str(path)!r} entry {i}") for i, p in enumerate(items)]


@dataclass(frozen=True)
class GenerationConfig:
    max_length: int | None
    max_new_tokens: int | None
    force_length: bool
    repetitions: int
    warmup: int
    fast: bool = False  # static KV cache and CUDA graphs (falcon_exp/decode.py)

    def __post_init__(self) -> None:
        _positive_int("max_length", self.max_length, minimum=2, optional=True)
        _positive_int("max_new_tokens", self.max_new_tokens, optional=True)
        if (self.max_length is None) == (self.max_new_tokens is None):
            raise ConfigError(
                f"max_length={self.max_length} and max_new_tokens={self.max_new_tokens}: set exactly one of them "
                "(the other to null)"
            )
        _positive_int("repetitions", self.repetitions)
        _positive_int("warmup", self.warmup, minimum=0)
        if not isinstance(self.fast, bool):
            raise ConfigError(f"generation.fast={self.fast!r} is not allowed; choose true or false")

    def new_tokens(self, prompt_tokens: int) -> int:
        """How many tokens to generate after a prompt of this length."""
        return self.max_new_tokens if self.max_new_tokens is not None else self.max_length - prompt_tokens


@dataclass(frozen=True)
class QualityConfig:
    enabled: bool = True
    reference_tokens: int = 32  # forced greedy tokens of the reference after each prompt
    eval_tokens: int | None = 128  # tokens of each evaluation text scored (null: all)
    window: int = 256  # perplexity window, non-overlapping

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"quality.enabled={self.enabled!r} is not allowed; choose true or false")
        _positive_int("quality.reference_tokens", self.reference_tokens)
        _positive_int("quality.eval_tokens", self.eval_tokens, minimum=2, optional=True)
        _positive_int("quality.window", self.window, minimum=2)


@dataclass(frozen=True)
class JobConfig:
    model: ModelConfig
    quantization: QuantizationConfig
    prompts: Prompts
    generation: GenerationConfig
    quality: QualityConfig = field(default_factory=QualityConfig)
    seed: int = 0
    device: str = "auto"
    dtype: str = "bfloat16"
    max_memory: dict | None = None
    experiment: str = "falcon-exp"
    setting: str = "custom"
    resume: bool = False
    flat: dict = field(default_factory=dict, compare=False)
    prequantized: bool = False  # the checkpoint's own weights are quantized (found before loading)

    def __post_init__(self) -> None:
        _one_of("device", self.device, DEVICES)
        _one_of("dtype", self.dtype, DTYPES)
        _positive_int("seed", self.seed, minimum=0)
        if not isinstance(self.resume, bool):
            raise ConfigError(f"resume={self.resume!r} is not allowed; choose true or false")

    @classmethod
    def from_hydra(cls, cfg: Any) -> JobConfig:
        """Validate a composed Hydra config (DictConfig or plain dict)."""
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):  # resolve all but hydra's own keys, which a sweep fills later
            raw = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in cfg if k != "hydra"}
        else:
            raw = {k: v for k, v in cfg.items() if k != "hydra"}
        model_raw = raw["model"]
        if not isinstance(model_raw, dict) or "name" not in model_raw:
            raise ConfigError(f"model={model_raw!r} is not a model config; choose one of: {', '.join(group_choices('model'))}")
        model = ModelConfig.from_dict(model_raw)
        raw["model"] = dataclasses.asdict(model)  # params show the model as resolved (a path names it)
        quant = dict(raw.get("quantization") or {})
        return cls(
            model=model,
            quantization=QuantizationConfig(bits=raw["bits"], **quant),
            prompts=Prompts.from_dict(raw["prompts"]),
            generation=GenerationConfig(
                max_length=raw.get("max_length"),
                max_new_tokens=raw.get("max_new_tokens"),
                force_length=bool(raw.get("force_length", True)),
                repetitions=raw.get("repetitions", 1),
                warmup=raw.get("warmup", 1),
                fast=(raw.get("generation") or {}).get("fast", False),
            ),
            quality=QualityConfig(**(raw.get("quality") or {})),
            seed=raw.get("seed", 0),
            device=raw.get("device", "auto"),
            dtype=raw.get("dtype", "bfloat16"),
            max_memory=raw.get("max_memory"),
            experiment=(raw.get("tracking") or {}).get("experiment", "falcon-exp"),
            setting=str(raw.get("setting", "custom")),
            resume=raw.get("resume", False),
            flat=flatten({k: v for k, v in raw.items() if k != "prompts"} | {"prompts": _prompts_summary(raw["prompts"])}),
        )

    def prequantized_as(self, quantization: QuantizationConfig) -> JobConfig:
        """The same job on a checkpoint that holds quantized weights, with the quantization found
        there (its params too)."""
        flat = self.flat | {"bits": quantization.bits} | {
            f"quantization.{f.name}": getattr(quantization, f.name) for f in dataclasses.fields(quantization) if f.name != "bits"
        }
        return dataclasses.replace(self, quantization=quantization, flat=flat, prequantized=True)

    @property
    def identity(self) -> str:
        """A hash of everything that shapes the measurement (the config, the prompts' text), for resume."""
        content = {k: v for k, v in self.flat.items() if k != "resume"} | {"prompts.items": list(self.prompts.items)}
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:32]

    @property
    def mode(self) -> str:
        """A short, human name: nf4, fp4, int8, or the baseline's dtype (bf16, fp16, fp32)."""
        return self.quantization.mode if self.quantization.bits != 16 else DTYPE_SHORT[self.dtype]


def _prompts_summary(raw: dict) -> dict:
    """Prompts go to MLflow as an artifact; params keep only what identifies the set."""
    return {"name": Path(raw["file"]).stem if raw.get("file") else raw.get("name"), "file": raw.get("file")}


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dicts to dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat

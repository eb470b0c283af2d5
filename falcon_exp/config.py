"""The typed, validated form of one job's configuration.

The YAML under falcon_exp/conf/ is the one source of defaults; the frozen dataclasses here have
its shape (top-level `bits`, `max_length`, ...; sections `model`, `prompts`, `generation`,
`quantization`, `quality`, `noise`, `tracking`) and only validate. `JobConfig.from_hydra` rejects bad input
with one line naming the bad value and the allowed ones, before any model, tokenizer or tracking
run exists.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from falcon_exp import backends
from falcon_exp.checks import boolean, installed, integer, memory_caps, one_of, readable_text
from falcon_exp.errors import ConfigError
from falcon_exp.prompts import check_prompt, read_prompts_file

BITS = (4, 8, 16)
WEIGHTS = ("packaged", "hub", "synthetic")
DTYPES = ("bfloat16", "float16", "float32")
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DEVICES = ("auto", "cpu", "cuda")
ARCHITECTURES_DIR = Path(__file__).parent / "architectures"
CONF_DIR = Path(__file__).resolve().parent / "conf"  # inside the package: a wheel carries it


def group_choices(group: str, config_dirs: tuple[Path, ...] = ()) -> list[str]:
    """The options of a config group: the package's own and those in the user's config dirs."""
    return sorted({p.stem for root in (CONF_DIR, *config_dirs) for p in (root / group).glob("*.y*ml")})


@functools.cache
def packaged_defaults() -> dict[str, Any]:
    """conf/config.yaml's values and each backend's (conf/backend/) by dotted key, read once per
    process (every job's identity asks)."""
    nodes = {path.stem: yaml.safe_load(path.read_text()) for path in (CONF_DIR / "backend").glob("*.yaml")}
    raw = yaml.safe_load((CONF_DIR / "config.yaml").read_text())
    return flatten(raw | {"quantization": raw["quantization"] | nodes})


def packaged_settings(backend: str) -> Any:
    """A backend's settings at the packaged defaults."""
    method = backends.get(backend)
    return method.settings(**{f.name: packaged_defaults()[f"quantization.{backend}.{f.name}"] for f in dataclasses.fields(method.settings)})


def available_architectures() -> list[str]:
    return sorted(p.stem for p in ARCHITECTURES_DIR.glob("*.json"))


def _group_path(model: str) -> str | None:
    """The model.path a packaged model group gives (Falcon's hub id), if the model is one."""
    group = CONF_DIR / "model" / f"{model}.yaml"
    return (yaml.safe_load(group.read_text()) or {}).get("path") if group.is_file() else None


@dataclass(frozen=True)
class ModelConfig:
    name: str
    weights: str  # packaged | hub | synthetic
    path: str | None
    architecture: str | None
    chat_template: bool
    synthetic_outliers: int  # hidden dims with outlier-sized norm gains (synthetic weights), 0 none
    outlier_gain: float

    def __post_init__(self) -> None:
        one_of("model.weights", self.weights, WEIGHTS)
        boolean("model.chat_template", self.chat_template)
        integer("model.synthetic_outliers", self.synthetic_outliers, minimum=0)
        if self.synthetic_outliers and self.weights != "synthetic":
            raise ConfigError(f"model.synthetic_outliers={self.synthetic_outliers} plants outliers in synthetic weights only; "
                              f"give model.weights=synthetic (model.weights={self.weights})")
        if isinstance(self.outlier_gain, bool) or not isinstance(self.outlier_gain, (int, float)) or self.outlier_gain <= 1:
            raise ConfigError(f"model.outlier_gain={self.outlier_gain!r} is not allowed; it must be a number > 1")
        if self.weights == "synthetic":
            one_of("model.architecture", self.architecture, tuple(available_architectures()))
            if self.path and self.path != _group_path(self.name):  # a packaged group names the hub id its architecture is of
                raise ConfigError(f"model.path={self.path!r} is not read by synthetic weights (model={self.name}, random values of "
                                  f"model.architecture={self.architecture}); drop model.path, or give model.weights=hub to load it")
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
        return _build(cls, raw, "model")


@dataclass(frozen=True)
class PromptsConfig:
    name: str
    items: tuple[str, ...]
    file: str | None

    @classmethod
    def from_dict(cls, raw: dict) -> PromptsConfig:
        file = raw.get("file")
        if file:
            return cls(name=Path(file).stem, items=tuple(read_prompts_file(Path(file))), file=str(file))
        items = raw.get("items") or []
        if not items:
            raise ConfigError(f"prompts={raw.get('name')!r} holds no prompts; give at least one (prompts.items or prompts.file)")
        return cls(name=raw["name"], items=tuple(check_prompt(p, f"prompts.items[{i}]") for i, p in enumerate(items)), file=None)


@dataclass(frozen=True)
class GenerationConfig:
    fast: bool  # static KV cache and CUDA graphs (falcon_exp/decode.py)
    compile: bool  # the fast path's step compiled before capture; false: the plain step captured (no compile to wait for)

    def __post_init__(self) -> None:
        boolean("generation.fast", self.fast)
        boolean("generation.compile", self.compile)


@dataclass(frozen=True)
class QuantizationConfig:
    """The backend (falcon_exp/backends/) and its own settings: the node quantization.<backend>.
    Every backend's node is checked; the chosen one's is the job's."""

    backend: str
    from_checkpoint: bool  # take bits and settings from the checkpoint's own quantization_config
    settings: Any  # the chosen backend's Settings
    nodes: dict = field(default_factory=dict, compare=False)  # every backend's settings as composed, by backend (identities of 0.2)

    @classmethod
    def from_dict(cls, raw: Any) -> QuantizationConfig:
        names = backends.names()
        if not isinstance(raw, dict):
            raise ConfigError(f"quantization={raw!r} is not allowed; it must be a mapping of backend, from_checkpoint, {', '.join(names)}")
        if unknown := sorted(set(raw) - {"backend", "from_checkpoint", *names}):
            raise ConfigError(f"quantization.{unknown[0]} is not a key of quantization; allowed: backend, from_checkpoint, "
                              f"{', '.join(names)} (each backend's settings sit under its name, e.g. quantization.{names[0]}.KEY)")
        method = backends.get(raw.get("backend"))
        boolean("quantization.from_checkpoint", raw.get("from_checkpoint"))
        settings = {name: _build(backends.get(name).settings, raw[name], f"quantization.{name}") for name in names if name in raw}
        if method.name not in settings:
            raise ConfigError(f"quantization.{method.name} is missing; give its settings (conf/backend/{method.name}.yaml)")
        return cls(method.name, raw["from_checkpoint"], settings[method.name], {name: dataclasses.asdict(s) for name, s in settings.items()})

    @property
    def method(self) -> backends.Backend:
        return backends.get(self.backend)

    def params(self) -> dict[str, Any]:
        """As logged: the backend, from_checkpoint, and the chosen backend's node alone."""
        return {"backend": self.backend, "from_checkpoint": self.from_checkpoint, self.backend: dataclasses.asdict(self.settings)}


@dataclass(frozen=True)
class QualityConfig:
    enabled: bool
    reference_tokens: int  # forced greedy tokens of the reference after each prompt
    eval_tokens: int | None  # tokens of each evaluation text scored (null: all)
    window: int  # perplexity window, non-overlapping
    corpus: str | None  # a plain-text file: perplexity and KL statistics on it (falcon_exp/corpus.py)
    corpus_context: int  # tokens per sliding window
    corpus_stride: int  # tokens the window moves by
    corpus_tokens: int | None  # the corpus cut to this many tokens (null: all)
    kl_tokens: int  # scored tokens the KL statistics cover
    tasks: list  # lm-evaluation-harness tasks: registered names, or YAML files (falcon_exp/tasks.py)
    limit: int | None  # examples per task at most (null: all)
    task_batch_size: int

    def __post_init__(self) -> None:
        boolean("quality.enabled", self.enabled)
        integer("quality.reference_tokens", self.reference_tokens)
        integer("quality.eval_tokens", self.eval_tokens, minimum=2, optional=True)
        integer("quality.window", self.window, minimum=2)
        integer("quality.corpus_context", self.corpus_context, minimum=2)
        integer("quality.corpus_stride", self.corpus_stride)
        if self.corpus_stride > self.corpus_context:
            raise ConfigError(f"quality.corpus_stride={self.corpus_stride} is not allowed; it must be at most quality.corpus_context="
                              f"{self.corpus_context} (a longer stride would leave tokens unscored)")
        integer("quality.corpus_tokens", self.corpus_tokens, minimum=2, optional=True)
        integer("quality.kl_tokens", self.kl_tokens)
        if self.corpus is not None:
            readable_text("quality.corpus", self.corpus)
        integer("quality.limit", self.limit, optional=True)
        integer("quality.task_batch_size", self.task_batch_size)
        if not isinstance(self.tasks, list) or not all(isinstance(t, str) and t for t in self.tasks):
            raise ConfigError(f"quality.tasks={self.tasks!r} is not allowed; give a list of lm-eval task names or task YAML files")
        for task in self.tasks:
            if task.endswith((".yaml", ".yml")):
                readable_text("quality.tasks", task)
        if not self.enabled and (self.corpus or self.tasks):
            raise ConfigError(f"quality.enabled=false but quality.{'corpus' if self.corpus else 'tasks'} is set; "
                              "set quality.enabled=true to score it, or drop it")
        if self.tasks and not installed("lm_eval"):
            raise ConfigError(f"quality.tasks={self.tasks} needs lm-evaluation-harness, which is not installed: "
                              'pip install "falcon-exp[eval]"')


@dataclass(frozen=True)
class NoiseConfig:
    """When a timed generation counts as disturbed by a busy machine, and how often it is run again (falcon_exp/noise.py)."""

    max_ratio: float  # over this many times its prompt's quickest decode time per token
    max_cpu_wait: float  # or its threads waited for a CPU over this share of its time
    reruns: int  # runs again of an off generation, at most

    def __post_init__(self) -> None:
        if isinstance(self.max_ratio, bool) or not isinstance(self.max_ratio, (int, float)) or not self.max_ratio > 1:
            raise ConfigError(f"noise.max_ratio={self.max_ratio!r} is not allowed; it must be a number > 1")
        if isinstance(self.max_cpu_wait, bool) or not isinstance(self.max_cpu_wait, (int, float)) or not 0 < self.max_cpu_wait <= 1:
            raise ConfigError(f"noise.max_cpu_wait={self.max_cpu_wait!r} is not allowed; it must be a number in (0, 1]")
        integer("noise.reruns", self.reruns, minimum=0)


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str  # the MLflow experiment; the store comes from MLFLOW_TRACKING_URI

    def __post_init__(self) -> None:
        if not isinstance(self.experiment, str) or not self.experiment.strip():
            raise ConfigError(f"tracking.experiment={self.experiment!r} is not allowed; give a non-empty name")


def knobs(bits: int, quantization: QuantizationConfig) -> dict[str, Any]:
    """The quantization settings that apply at these bits and backend, by their config key (bits
    first): the unquantized baseline has none, and a backend's 8-bit ignores its 4-bit settings
    and the other way round."""
    if bits == 16:
        return {"bits": bits}
    name, settings = quantization.backend, quantization.settings
    applying = {f"quantization.{name}.{k}": getattr(settings, k) for k in quantization.method.knobs(bits)}
    return {"bits": bits, "quantization.backend": name} | applying


def _build(cls: type, raw: Any, where: str) -> Any:
    """A config section from its YAML mapping; an unknown or missing key is one line."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}={raw!r} is not allowed; it must be a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
    names = [f.name for f in dataclasses.fields(cls)]
    if unknown := sorted(set(raw) - set(names)):
        raise ConfigError(f"{where}.{unknown[0]} is not a key of {where}; allowed: {', '.join(n for n in names if n != 'flat')}")
    if missing := [n for n in names if n not in raw]:
        raise ConfigError(f"{where}.{missing[0]} is missing; give {where}.{missing[0]}=VALUE")
    return cls(**raw)


@dataclass(frozen=True)
class JobConfig:
    """One job's configuration, in the YAML's shape."""

    setting: str
    bits: int
    max_length: int | None
    max_new_tokens: int | None
    force_length: bool
    batch_size: int  # sequences decoded together
    repetitions: int
    warmup: int
    seed: int
    device: str
    dtype: str
    max_memory: dict | None
    resume: bool
    model: ModelConfig
    prompts: PromptsConfig
    generation: GenerationConfig
    quantization: QuantizationConfig
    quality: QualityConfig
    noise: NoiseConfig
    tracking: TrackingConfig
    flat: dict = field(compare=False)  # the params: dotted keys, as resolved

    def __post_init__(self) -> None:
        one_of("bits", self.bits if isinstance(self.bits, int) and not isinstance(self.bits, bool) else str(self.bits), BITS)
        integer("max_length", self.max_length, minimum=2, optional=True)
        integer("max_new_tokens", self.max_new_tokens, optional=True)
        if (self.max_length is None) == (self.max_new_tokens is None):
            raise ConfigError(
                f"max_length={self.max_length} and max_new_tokens={self.max_new_tokens}: set exactly one of them "
                "(the other to null)"
            )
        boolean("force_length", self.force_length)
        integer("batch_size", self.batch_size)
        if self.batch_size > 1 and (self.max_new_tokens is None or not self.force_length):
            raise ConfigError(f"batch_size={self.batch_size} decodes sequences together, each generating the same tokens: give "
                              "max_new_tokens=N (and max_length=null) and force_length=true")
        integer("repetitions", self.repetitions)
        integer("warmup", self.warmup, minimum=0)
        integer("seed", self.seed, minimum=0)
        one_of("device", self.device, DEVICES)
        one_of("dtype", self.dtype, DTYPES)
        memory_caps(self.max_memory)
        boolean("resume", self.resume)

    @classmethod
    def from_hydra(cls, cfg: Any) -> JobConfig:
        """Validate a composed Hydra config (DictConfig or plain dict)."""
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):  # resolve all but hydra's own keys, which a sweep fills later
            raw = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in cfg if k != "hydra"}
        else:
            raw = {k: v for k, v in cfg.items() if k != "hydra"}
        model_raw = raw.get("model")
        if not isinstance(model_raw, dict) or "name" not in model_raw:
            raise ConfigError(f"model={model_raw!r} is not a model config; choose one of: {', '.join(group_choices('model'))}")
        model = ModelConfig.from_dict(model_raw)
        sections = {"model": model, "prompts": PromptsConfig.from_dict(raw.get("prompts") or {})}
        sections["quantization"] = QuantizationConfig.from_dict(raw.get("quantization"))
        for name, kind in (("generation", GenerationConfig), ("quality", QualityConfig), ("noise", NoiseConfig), ("tracking", TrackingConfig)):
            sections[name] = _build(kind, raw.get(name), name)
        top = {k: v for k, v in raw.items() if k not in sections}
        params = top | {k: dataclasses.asdict(v) for k, v in sections.items() if k not in ("prompts", "quantization")}
        params["quantization"] = sections["quantization"].params()
        params["prompts"] = {"name": sections["prompts"].name, "file": sections["prompts"].file}  # the texts are an artifact
        return _build(cls, top | sections | {"flat": flatten(params)}, "config")

    def new_tokens(self, prompt_tokens: int) -> int:
        """How many tokens to generate after a prompt of this length."""
        return self.max_new_tokens if self.max_new_tokens is not None else self.max_length - prompt_tokens

    def knobs(self) -> dict[str, Any]:
        return knobs(self.bits, self.quantization)

    def with_quantization(self, bits: int, quantization: QuantizationConfig) -> JobConfig:
        """The same job at other bits and settings (found in a checkpoint, or the unquantized baseline), its params too."""
        kept = {k: v for k, v in self.flat.items() if not k.startswith("quantization.")}
        flat = kept | {"bits": bits} | flatten({"quantization": quantization.params()})
        return dataclasses.replace(self, bits=bits, quantization=quantization, flat=flat)

    @property
    def mode(self) -> str:
        """A short, human name: the backend's (nf4, int8, ao-int4, hqq4, ...), or the baseline's
        dtype (bf16, fp16, fp32)."""
        return DTYPE_SHORT[self.dtype] if self.bits == 16 else self.quantization.method.mode(self.bits, self.quantization.settings).mode

    @property
    def scheme(self) -> str:
        """What the weights are, by the backend's name for it (nf4, llm.int8, int4_weight_only,
        hqq_4bit, ...); none unquantized."""
        return "none" if self.bits == 16 else self.quantization.method.mode(self.bits, self.quantization.settings).scheme


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

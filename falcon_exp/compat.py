"""Compatibility with earlier releases, in one place: each shim says what it keeps working and the
release that removes it. Torch-free: the command line, the job's identity and the analysis read it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from falcon_exp import backends, schema
from falcon_exp.cli import PRESET_GROUP, override_key
from falcon_exp.config import packaged_defaults

if TYPE_CHECKING:
    import pandas as pd

# The preset group was called `experiment` until 0.2 (it clashed with the MLflow experiment).
# Removed in 0.3.
OLD_PRESET_GROUP = "experiment"


def renamed_groups(arguments: list[str]) -> tuple[list[str], list[str]]:
    """`experiment=article` is `preset=article`: the arguments with the old group renamed, and a
    notice for each renamed one."""
    renamed, notices = [], []
    for argument in arguments:
        if override_key(argument) == OLD_PRESET_GROUP and "=" in argument:
            argument = argument.replace(OLD_PRESET_GROUP, PRESET_GROUP, 1)
            notices.append(f"`{OLD_PRESET_GROUP}=` is now `{PRESET_GROUP}=` (the MLflow experiment is tracking.experiment); "
                           f"the old name is read until falcon-exp 0.3")
        renamed.append(argument)
    return renamed, notices


# Until 0.2 every backend's settings sat flat in `quantization` (quantization.quant_type,
# quantization.group_size, ...); since 0.3 each sits under its backend (quantization.bitsandbytes.
# quant_type). The old keys are read on the command line, in earlier runs' params and in their
# identities. Removed in 1.0.
FORMER_KEYS = {f"quantization.{old}": f"quantization.{b.name}.{new}" for b in backends.REGISTRY.values() for old, new in b.former_keys.items()}


def renamed_keys(arguments: list[str]) -> tuple[list[str], list[str]]:
    """`quantization.quant_type=fp4` is `quantization.bitsandbytes.quant_type=fp4`: the arguments
    with old keys renamed, and a notice for each."""
    renamed, notices = [], []
    for argument in arguments:
        key = override_key(argument)
        if key in FORMER_KEYS and "=" in argument:
            argument = argument.replace(key, FORMER_KEYS[key], 1)
            notices.append(f"`{key}` is now `{FORMER_KEYS[key]}` (each backend's settings sit under its name); "
                           "the old name is read until falcon-exp 1.0")
        renamed.append(argument)
    return renamed, notices


def identity_params(flat: dict, nodes: dict[str, dict]) -> dict:
    """A job's params in the shape its backend's runs had when that backend came, so that resume=true
    finds them: for a backend of 0.1 or 0.2, every such backend's settings flat under their old keys,
    as composed (`nodes`, by backend; 0.2 logged them all), and for 0.1's backend (bitsandbytes alone
    then) neither quantization.backend nor what later backends added."""
    chosen = backends.get(flat["quantization.backend"])
    if chosen.since not in ("0.1", "0.2"):
        return flat
    shaped = {k: v for k, v in flat.items() if not any(k.startswith(f"quantization.{name}.") for name in backends.names())}
    defaults = packaged_defaults()
    for old, new in FORMER_KEYS.items():
        owner, leaf = new.split(".")[1:]
        if backends.get(owner).since == "0.1" or chosen.since == "0.2":
            shaped[old] = flat[new] if owner == chosen.name else nodes.get(owner, {}).get(leaf, defaults[new])
    if chosen.since == "0.1":
        del shaped["quantization.backend"]
    return shaped


# Settings added in 0.3: at the default the package ships they stay out of a job's identity, so
# that resume=true still finds the runs logged before them. Removed in 1.0.
ADDED_IN_03 = ("batch_size", "noise.max_ratio", "noise.max_cpu_wait", "noise.reruns", "quality.corpus", "quality.corpus_context",
               "quality.corpus_stride", "quality.corpus_tokens", "quality.kl_tokens", "quality.tasks", "quality.limit",
               "quality.task_batch_size", "generation.compile")


def added_at_default(flat: dict) -> set[str]:
    """The keys of ADDED_IN_03 that hold the packaged default in these params."""
    defaults = packaged_defaults()
    return {key for key in ADDED_IN_03 if key in flat and flat[key] == defaults[key]}


# 0.1's metric names, read by the analysis under today's (same meaning). Removed in 0.4.
RENAMED_METRICS = {
    "time/tokens_per_s": schema.E2E_TOKENS_PER_S,
    "sample/time/tokens_per_s": schema.sample(schema.E2E_TOKENS_PER_S),
}

# Up to 0.2 the read bandwidth was a large reduction's, and runs did not say so. Removed in 0.4.
READ_METHOD_BEFORE_03 = "reduction"

# 0.1's runs logged neither backend nor scheme: bitsandbytes was the only backend (0.1's), and the
# scheme followed from the mode. Removed in 0.4.
FIRST_BACKEND = next(b for b in backends.REGISTRY.values() if b.since == "0.1")
SCHEME_OF_01_MODE = {m.mode: m.scheme for m in FIRST_BACKEND.modes}


def with_backend_and_scheme(runs: pd.DataFrame, backend: str, scheme: str) -> pd.DataFrame:
    """The runs with the `backend` and `scheme` columns 0.1's runs lack filled in; the
    unquantized baseline's scheme is `none`."""
    import pandas as pd

    unlogged = pd.Series(None, index=runs.index, dtype=object)
    schemes = runs.get(scheme, unlogged).fillna(runs[schema.PARAM_MODE].map(SCHEME_OF_01_MODE).fillna("none"))
    return runs.assign(**{backend: runs.get(backend, unlogged).fillna(FIRST_BACKEND.name), scheme: schemes})


def with_settings_under_backends(runs: pd.DataFrame) -> pd.DataFrame:
    """0.1's and 0.2's runs with their flat quantization settings under today's keys, kept only on
    the runs of the backend they belong to (0.2 logged every backend's settings on every run)."""
    for old, new in FORMER_KEYS.items():
        if old in runs:
            owner = new.split(".")[1]
            moved = runs[old].where(runs["quantization.backend"] == owner)
            runs = runs.drop(columns=old).assign(**{new: runs[new].fillna(moved) if new in runs else moved})
    return runs


# What a run before 0.3 did, said by the key 0.3 added for it: one sequence at a time, the fast
# path's step compiled, no corpus and no tasks (their window and limits then mean nothing, as on
# a run today that has none). The noise keys are not among them: no run before 0.3 checked noise.
AS_BEFORE_03 = tuple(key for key in ADDED_IN_03 if not key.startswith("noise."))


def with_keys_added_in_03(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs before 0.3 with AS_BEFORE_03's keys as a run at the packaged defaults logs them
    ("True", "None", "[]"), so that no such key tells old runs from new; batch_size as a number. Removed in 1.0."""
    defaults = packaged_defaults()
    filled = {key: runs[key].fillna(str(defaults[key])) if key in runs else str(defaults[key]) for key in AS_BEFORE_03}
    return runs.assign(**filled).astype({"batch_size": int})

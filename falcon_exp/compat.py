"""Compatibility with earlier releases, in one place: each shim says what it keeps working and the
release that removes it. Torch-free: the command line, the job's identity and the analysis read it."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from falcon_exp import schema
from falcon_exp.cli import PRESET_GROUP, override_key

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


# Settings that 0.1's runs (bitsandbytes the only backend) did not have: a bitsandbytes job leaves
# them out of its identity, so that resume=true still finds those runs. Removed in 1.0.
NOT_IN_01_IDENTITIES = ("quantization.backend", "quantization.group_size", "quantization.torchao_8bit")

# Settings added in 0.3: at the default the package ships they stay out of a job's identity, so
# that resume=true still finds the runs logged before them. Removed in 1.0.
ADDED_IN_03 = ("noise.max_ratio", "noise.max_cpu_wait", "noise.reruns", "quality.corpus", "quality.corpus_context",
               "quality.corpus_stride", "quality.corpus_tokens", "quality.kl_tokens", "quality.tasks", "quality.limit",
               "quality.task_batch_size")


def added_at_default(flat: dict) -> set[str]:
    """The keys of ADDED_IN_03 that hold the packaged default in these params."""
    defaults = _packaged_defaults()
    return {key for key in ADDED_IN_03 if key in flat and flat[key] == defaults[key]}


@functools.cache
def _packaged_defaults() -> dict:
    """conf/config.yaml's values by dotted key, read once per process (every job's identity asks)."""
    import yaml

    from falcon_exp.config import CONF_DIR, flatten

    return flatten(yaml.safe_load((CONF_DIR / "config.yaml").read_text()))


# 0.1's metric names, read by the analysis under today's (same meaning). Removed in 0.4.
RENAMED_METRICS = {
    "time/tokens_per_s": schema.E2E_TOKENS_PER_S,
    "sample/time/tokens_per_s": schema.sample(schema.E2E_TOKENS_PER_S),
}

# Up to 0.2 the read bandwidth was a large reduction's, and runs did not say so. Removed in 0.4.
READ_METHOD_BEFORE_03 = "reduction"

# 0.1's runs logged neither backend nor scheme: bitsandbytes was the only backend, and the scheme
# followed from the mode. Removed in 0.4.
SCHEME_OF_01_MODE = {"nf4": "nf4", "fp4": "fp4", "int8": "llm.int8"}


def with_backend_and_scheme(runs: pd.DataFrame, backend: str, scheme: str) -> pd.DataFrame:
    """The runs with the `backend` and `scheme` columns 0.1's runs lack filled in; the
    unquantized baseline's scheme is `none`."""
    import pandas as pd

    unlogged = pd.Series(None, index=runs.index, dtype=object)
    schemes = runs.get(scheme, unlogged).fillna(runs[schema.PARAM_MODE].map(SCHEME_OF_01_MODE).fillna("none"))
    return runs.assign(**{backend: runs.get(backend, unlogged).fillna("bitsandbytes"), scheme: schemes})

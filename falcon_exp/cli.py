"""The command line before Hydra sees it: config folders the user adds, checks
that need only the arguments (a group choice, settings beside quantization.from_checkpoint), and
the order of a sweep's overrides."""

from __future__ import annotations

from pathlib import Path

from falcon_exp.config import group_choices
from falcon_exp.errors import ConfigError

PRESET_GROUP = "preset"


def override_key(argument: str) -> str:
    """`+quantization.hqq.axis=0` -> `quantization.hqq.axis`."""
    return argument.lstrip("+~").partition("=")[0]


def user_config_dirs(arguments: list[str]) -> tuple[Path, ...]:
    """Config folders a user adds with Hydra's usual means: `--config-dir DIR` (`-cd DIR`) and
    `hydra.searchpath=[file://DIR, pkg://PACKAGE/PATH]`."""
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
        if key not in ("model", "prompts", PRESET_GROUP) or not value:
            continue
        allowed = group_choices(key, config_dirs)
        for choice in value.split(","):
            if choice not in allowed and choice != "null":
                raise ConfigError(f"{key}={choice!r} is not allowed; choose one of: {', '.join(allowed)}")


# Keys that decide which weights load; a sweep varies them slowest so that each model loads once.
LOAD_SHAPING = ("model", PRESET_GROUP, "bits", "quantization", "dtype", "device", "max_memory", "seed")


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


def check_checkpoint_overrides(arguments: list[str]) -> None:
    """`quantization.from_checkpoint=true` takes bits and every quantization setting from the
    checkpoint: one given beside it would name the run after what did not run."""
    overrides = [a for a in arguments if "=" in a and not a.startswith("-")]
    asked = [a.partition("=")[2].lower().split(",") for a in overrides if override_key(a) == "quantization.from_checkpoint"]
    if not any("true" in values for values in asked):
        return
    given = [a for a in overrides if override_key(a) == "bits"
             or (override_key(a).startswith("quantization.") and override_key(a) != "quantization.from_checkpoint")]
    if given:
        raise ConfigError(f"{', '.join(given)} beside quantization.from_checkpoint=true: the checkpoint's own quantization_config "
                          "decides bits and every quantization setting; drop them, or set quantization.from_checkpoint=false")


def integral_bits(arguments: list[str]) -> list[str]:
    """`bits=4.0` is `bits=4`: one job, one name, one identity, however the number is written."""

    def integral(value: str) -> str:
        try:
            number = float(value)
        except ValueError:
            return value
        return str(int(number)) if number.is_integer() else value

    return [f"{a.partition('=')[0]}={','.join(integral(v) for v in a.partition('=')[2].split(','))}"
            if override_key(a) == "bits" and "=" in a and not a.startswith("-") else a for a in arguments]

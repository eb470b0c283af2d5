"""What machine and software produced a number: logged as tags on every run."""

from __future__ import annotations

import importlib.util
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from falcon_exp import backends, schema

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "accelerate", *backends.packages(), "lm_eval", "hydra-core", "mlflow", "falcon-exp")
PROVIDED_BY = {"mlflow": ("mlflow", "mlflow-skinny")}  # MLflow's slimmer build installs the same `mlflow` modules
IMPORTED_AS = {"hydra-core": "hydra", "falcon-exp": "falcon_exp"}
# falcon-exp patches these libraries' internals (Falcon's linear class and head split; each
# backend names its own): the versions it was tested with, as pinned in constraints.txt.
TESTED = {"transformers": ("5.24.0",)} | backends.tested()


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> str:
    """The installed version; `3.17.2 (mlflow-skinny)` where another distribution provides the
    package's modules; `source tree` where they import with no distribution installed (a checkout
    on PYTHONPATH); `absent` where they do not import."""
    for distribution in PROVIDED_BY.get(package, (package,)):
        try:
            version = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
        return version if distribution == package else f"{version} ({distribution})"
    return "source tree" if importlib.util.find_spec(IMPORTED_AS.get(package, package)) else "absent"


def untested_versions() -> list[str]:
    """`transformers 5.30.0 (tested: 5.24.0)` for each installed patched library at a version not tested."""
    return [f"{package} {_version(package)} (tested: {', '.join(tested)})" for package, tested in TESTED.items()
            if _version(package) not in (*tested, "absent")]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvml() -> Any:
    """pynvml, initialised: the one way into NVML (for the driver here, the processes' memory in
    falcon_exp.measure). Raises where there is none (not installed, no driver)."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def _nvidia_driver() -> str | None:
    try:
        version = nvml().nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # noqa: BLE001 - no NVML: ask nvidia-smi
        pass
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else None


def commit() -> str | None:
    """The commit that runs. A copy of the tree on another machine (a lent GPU) may carry no .git
    or a stale one: the commit named in FALCON_EXP_GIT_COMMIT wins."""
    return os.environ.get("FALCON_EXP_GIT_COMMIT") or _git("rev-parse", "HEAD")


def describe(device: str) -> dict[str, str]:
    """Tags: git state, host, device and driver, library versions."""
    import torch

    named = os.environ.get("FALCON_EXP_GIT_COMMIT")  # then nothing is known about uncommitted changes
    dirty = None if named else _git("status", "--porcelain")  # untracked files count: they can change what runs
    tags = {
        schema.TAG_GIT_COMMIT: commit() or "unknown",
        schema.TAG_GIT_DIRTY: "unknown" if dirty is None else str(bool(dirty)).lower(),
        schema.TAG_HOST: socket.gethostname(),
        schema.TAG_PYTHON: platform.python_version(),
        schema.TAG_CPU: _cpu_name(),
        schema.TAG_CPU_CORES: str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        schema.TAG_CPU_CAPABILITY: torch.backends.cpu.get_cpu_capability(),
        schema.TAG_TORCH_THREADS: str(torch.get_num_threads()),
        schema.TAG_DEVICE_KIND: device,
    }
    if device == "cuda":
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        tags |= {
            schema.TAG_DEVICE_NAME: names[0],
            schema.TAG_DEVICE_NAMES: ", ".join(names),
            schema.TAG_DEVICE_COUNT: str(len(names)),
            schema.TAG_DEVICE_DRIVER: _nvidia_driver() or "unknown",
            schema.TAG_DEVICE_CUDA: torch.version.cuda or "unknown",
        }
    else:
        tags |= {schema.TAG_DEVICE_NAME: tags[schema.TAG_CPU], schema.TAG_DEVICE_COUNT: "1"}
    if os.environ.get("SLURM_JOB_ID"):  # which SLURM job ran it, to find its log or cancel it
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        tags[schema.TAG_SLURM_JOB] = f"{array}_{task}" if array and task else os.environ["SLURM_JOB_ID"]
    tags |= {schema.version_tag(p): _version(p) for p in PACKAGES}
    if untested := untested_versions():
        tags[schema.TAG_UNTESTED_VERSIONS] = "; ".join(untested)
    return tags

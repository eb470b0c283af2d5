"""The Hydra job and the sweep's callback: validate, then run and track one job.

Bad input stops everything with one line (exit 2) before any model loads or any run is logged;
a sweep validates all its jobs first. A job that fails at run time is logged as FAILED and the
sweep goes on; the sweep then ends with a summary and exit code 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from falcon_exp import environment, runner, tracking
from falcon_exp.config import ConfigError, FalconExpError, JobConfig, override_key
from falcon_exp.console import EXIT_BAD_INPUT, EXIT_JOB_FAILED, fail, log, quiet_third_party
from falcon_exp.models import MODELS, resolve_device, with_checkpoint_quantization

SWEEP_FILE = "falcon_exp_sweep.json"


@dataclass(frozen=True)
class Sweep:
    """What the jobs of a sweep share, in whatever process or machine runs them (joblib, SLURM),
    through a file in the sweep folder: the parent run; the override keys whose values differ
    between jobs (they name the child runs); the longest continuation any job generates and
    whether any job may stop at end-of-sequence (the quality reference's text is made that long,
    by both stopping rules where needed, at once, so that no later job evicts a loaded model to
    extend it)."""

    parent_run_id: str
    varying: tuple[str, ...]
    longest_new_tokens: int
    stops_early: bool

    def save(self, sweep_dir: Path) -> None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def of(cls, sweep_dir: Path) -> Sweep | None:
        path = sweep_dir / SWEEP_FILE
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return cls(**raw | {"varying": tuple(raw["varying"])})


def varying_keys(jobs: list[list[str]]) -> tuple[str, ...]:
    """The override keys whose value is not the same in every job, in command-line order."""
    values: dict[str, set[str]] = {}
    for overrides in jobs:
        for override in overrides:
            values.setdefault(override_key(override), set()).add(override.partition("=")[2])
    return tuple(key for key, seen in values.items() if len(seen) > 1)


def job_name(job: JobConfig, sweep: Sweep | None) -> str:
    """The job's overrides that vary within its sweep (`bits=4`, `bits=8,generation.fast=true`);
    outside a sweep all its overrides; with none, model and mode."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra job
        overrides = []
    if sweep is not None and sweep.varying:
        overrides = [o for o in overrides if override_key(o) in sweep.varying]
    return ",".join(overrides) or f"{job.model.name},{job.mode}"


def _in_sweep() -> Path | None:
    try:
        hydra = HydraConfig.get()
    except ValueError:
        return None
    return Path(hydra.sweep.dir) if hydra.mode.name == "MULTIRUN" else None


@functools.cache
def _environment_tags(device: str) -> dict[str, str]:
    return environment.describe(device)


def _quantization_source(job: JobConfig) -> str:
    if job.quantization.from_checkpoint:
        return "checkpoint: the checkpoint's own quantization_config, as found"
    return "request, which the checkpoint's own quantization_config matches" if job.prequantized else "request"


def validate(cfg: DictConfig) -> tuple[JobConfig, runner.Prepared]:
    """Everything that can be wrong with the input, found before anything loads or is logged."""
    job = with_checkpoint_quantization(JobConfig.from_hydra(cfg))
    return job, runner.prepare(job)


def run_job(cfg: DictConfig) -> str:
    """One Hydra job. Returns the MLflow run status."""
    quiet_third_party()
    try:
        job, prepared = validate(cfg)
        tracking.check_store()
        device = resolve_device(job.device)
    except FalconExpError as error:
        fail(error, EXIT_BAD_INPUT)
    sweep_dir = _in_sweep()
    sweep = Sweep.of(sweep_dir) if sweep_dir else None
    parent = sweep.parent_run_id if sweep else None
    name = job_name(job, sweep)
    if job.resume and (done := tracking.finished_run(job)):
        log.info(f"skipping {name}: this exact configuration finished as run {done} (resume=true)")
        return "SKIPPED"
    tags = _environment_tags(device) | {
        "falcon_exp.model": job.model.name,
        "falcon_exp.weights": job.model.weights,
        "falcon_exp.mode": job.mode,
        "falcon_exp.quantization_source": _quantization_source(job),
    }
    if job.model.weights == "synthetic":
        tags["falcon_exp.text"] = "meaningless: synthetic (random) weights; memory and time are real"
    try:
        hydra_dir = HydraConfig.get().runtime.output_dir
        tags["falcon_exp.output_dir"] = hydra_dir
    except ValueError:
        hydra_dir = None
    try:
        with tracking.job_run(job, name, tags, OmegaConf.to_yaml(cfg, resolve=True), parent, hydra_dir) as run_id:
            result = runner.run(job, prepared, sweep)
            tracking.log_result(run_id, job, result)
    except KeyboardInterrupt:  # the job's run is KILLED already; so is its sweep
        MODELS.clear()
        if parent:
            tracking.end_run(parent, "KILLED")
        raise
    except Exception as error:  # noqa: BLE001 - logged as FAILED; the sweep goes on
        MODELS.clear()
        log.error(f"job {name} FAILED: {tracking.one_line(error)}")
        if sweep_dir is None:
            sys.exit(EXIT_JOB_FAILED)
        return "FAILED"
    for sample in result.samples:
        if sample.repetition == 0:
            print(f"\n[{job.mode}] Q: {sample.prompt}\nA: {sample.output.strip()}", flush=True)
    log.info(f"run {name} FINISHED in {tracking.tracking_uri()} (experiment {job.experiment}, run {run_id})")
    return "FINISHED"


class SweepCallback(Callback):
    """Before a sweep: validate every job and open the parent run. After: close it, print the
    summary, exit 1 if any job failed."""

    parent: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        loader = GlobalHydra.instance().config_loader()
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(list(config.hydra.overrides.task))
        jobs = [list(o) for batch in BasicSweeper.split_arguments(parsed, None) for o in batch]
        quiet_third_party()
        try:
            validated = [validate(loader.load_sweep_config(config, o)) for o in jobs]
            tracking.check_store()
        except FalconExpError as error:
            fail(error, EXIT_BAD_INPUT)
        experiments = {job.experiment for job, _ in validated}
        if len(experiments) > 1:
            fail(ConfigError(f"tracking.experiment takes one value per sweep, not {sorted(experiments)}"), EXIT_BAD_INPUT)
        varying = varying_keys(jobs)
        common = {override_key(o): o.partition("=")[2] for o in jobs[0] if override_key(o) not in varying}
        name = "sweep " + (" ".join(config.hydra.overrides.task) or "defaults")
        sweep_dir = Path(config.hydra.sweep.dir)
        self.parent = tracking.start_sweep_run(experiments.pop(), name, sweep_dir, common | {"sweep.varying": ",".join(varying)})
        longest = max(max(prepared.new_tokens) for _, prepared in validated)
        Sweep(self.parent, varying, longest, any(not job.generation.force_length for job, _ in validated)).save(sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.parent is None:
            return
        try:
            children = tracking.end_sweep_run(self.parent)
        except Exception as error:  # noqa: BLE001 - the store went away during the sweep
            fail(f"could not close the sweep's run {self.parent} in {tracking.tracking_uri()}: {tracking.one_line(error)}",
                 EXIT_JOB_FAILED)
        tracking.print_summary(children)
        failed = [c for c in children if c.info.status != "FINISHED"]
        if failed:
            print(f"falcon-exp: {len(failed)} of {len(children)} jobs failed", file=sys.stderr, flush=True)
            sys.exit(EXIT_JOB_FAILED)

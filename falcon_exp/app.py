"""One Hydra job: resolve it, then run and track it.

Bad input stops the job with one line (exit 2) before any model loads or any run is logged. A
job that fails at run time is logged as FAILED; inside a sweep the sweep goes on
(falcon_exp/sweep.py ends it with a summary and exit code 1).
"""

from __future__ import annotations

import functools
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from falcon_exp import environment, lifecycle, resume, runner, schema, store, tracking
from falcon_exp.console import log, one_line, quiet_third_party, stop_on_signals, stopped_by
from falcon_exp.errors import FalconExpError, JobFailed
from falcon_exp.job import Job, resolve
from falcon_exp.models import MODELS
from falcon_exp.records import SweepNeeds
from falcon_exp.sweep import Sweep, job_label, opened_here, record_outcome


def job_name(job: Job, sweep: Sweep | None) -> str:
    """The job's overrides that vary within its sweep (`bits=4`, `bits=8,generation.fast=true`);
    outside a sweep all its overrides; with none, model and mode."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra job
        overrides = []
    return job_label(overrides, sweep.varying if sweep else ()) or f"{job.config.model.name},{job.config.mode}"


def _in_sweep() -> Path | None:
    try:
        hydra = HydraConfig.get()
    except ValueError:
        return None
    return Path(hydra.sweep.dir) if hydra.mode.name == "MULTIRUN" else None


@functools.cache
def _environment_tags(device: str) -> dict[str, str]:
    tags = environment.describe(device)
    if untested := tags.get(schema.TAG_UNTESTED_VERSIONS):
        log.warning(f"untested library versions: {untested}; falcon-exp patches their internals, so check its numbers "
                    "(`pip install -c constraints.txt` gives the tested ones)")
    return tags


def _tags(job: Job) -> dict[str, str]:
    config = job.config
    if config.quantization.from_checkpoint:
        source = "checkpoint: the checkpoint's own quantization_config, as found"
    else:
        source = "request, which the checkpoint's own quantization_config matches" if job.weights.prequantized else "request"
    tags = _environment_tags(job.device) | {
        schema.TAG_MODEL: config.model.name,
        schema.TAG_WEIGHTS: config.model.weights,
        schema.TAG_MODE: config.mode,
        schema.TAG_QUANTIZATION_SOURCE: source,
    }
    if job.weights.kind == "synthetic":
        tags[schema.TAG_TEXT] = "meaningless: synthetic (random) weights; memory and time are real"
    if config.batch_size > 1:
        prompts, batches = len(job.prompts.input_ids), len(job.prompts.batches)
        cycled = ", cycled to fill them" if batches * config.batch_size > prompts else ""
        tags[schema.TAG_BATCH_PROMPTS] = (f"{prompts} prompts in {batches} batches of {config.batch_size}{cycled}; "
                                          f"at least {job.prompts.distinct} distinct in each")
    return tags


def _config_as_run(cfg: DictConfig, job: Job) -> str:
    """The resolved config as YAML, with the bits and quantization settings that ran: a
    checkpoint's own where quantization.from_checkpoint took them, not the defaults beside them."""
    ran = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    ran.bits, ran.quantization = job.config.bits, job.config.quantization.params()
    return OmegaConf.to_yaml(ran)


def run_job(cfg: DictConfig) -> str:
    """One Hydra job. Returns how it ended (FINISHED, FAILED, KILLED, SKIPPED); inside a sweep it
    also leaves that in the sweep folder for the sweep's end."""
    stop_on_signals()  # also in a joblib worker or a SLURM job, whose process gets the signal
    quiet_third_party()
    sweep_dir = _in_sweep()
    outcome = _Outcome(sweep_dir, HydraConfig.get().job.num if sweep_dir else 0)
    try:
        return _run_job(cfg, outcome)
    except KeyboardInterrupt as error:  # the job's run, if it has one, is KILLED already
        MODELS.clear()
        sweep = Sweep.of(sweep_dir) if sweep_dir else None
        if sweep is None or opened_here(sweep.parent_run_id):
            raise  # this process runs the sweep (or the job alone): the command stops, closing its sweep as KILLED
        # a job of a sweep run elsewhere (SLURM's time limit or scancel, a joblib worker):
        # it ends, the sweep goes on, and the process that opened the sweep closes it
        log.error(f"job {outcome.name} KILLED: stopped by {stopped_by(error)}")
        return outcome.ended("KILLED", f"stopped by {stopped_by(error)}")


class _Outcome:
    """What a job of a sweep leaves for the sweep's end: its name, its run, how it ended."""

    def __init__(self, sweep_dir: Path | None, job_num: int) -> None:
        self.sweep_dir, self.job_num = sweep_dir, job_num
        self.name, self.run_id = f"job {job_num}", None

    def ended(self, status: str, why: str | None = None) -> str:
        if self.sweep_dir is not None:
            record_outcome(self.sweep_dir, self.job_num, self.name, status, self.run_id, why)
        return status


def _run_job(cfg: DictConfig, outcome: _Outcome) -> str:
    job = resolve(cfg)
    sweep_dir = outcome.sweep_dir
    sweep = Sweep.of(sweep_dir) if sweep_dir else None
    name = outcome.name = job_name(job, sweep)
    try:
        store.check()
    except FalconExpError as error:
        if sweep_dir is None:
            raise
        log.error(f"job {name} FAILED: {error}")  # the sweep goes on: the store may come back for the next job
        return outcome.ended("FAILED", str(error))
    if sweep and (earlier := sweep.repeats.get(str(outcome.job_num))):
        log.info(f"skipping {name}: it measures what job {earlier} measures (they differ only in settings that do not apply "
                 f"to {job.config.mode})")
        return outcome.ended("SKIPPED")
    if job.config.resume:
        for closed in resume.close_orphans(job):
            log.warning(f"closed {closed} as FAILED: it was left RUNNING by a process that is gone")
        if done := resume.finished_run(job):
            log.info(f"skipping {name}: this exact configuration finished as run {done} (resume=true)")
            outcome.run_id = done  # it stands for this configuration in the sweep's analysis
            return outcome.ended("SKIPPED")
    tags = _tags(job)
    try:
        hydra_dir = HydraConfig.get().runtime.output_dir
        tags[schema.TAG_OUTPUT_DIR] = hydra_dir
    except ValueError:
        hydra_dir = None
    parent = sweep.parent_run_id if sweep else None
    try:
        with lifecycle.job_run(job, name, tags, _config_as_run(cfg, job), parent, hydra_dir) as run_id:
            outcome.run_id = run_id
            result = runner.run(job, sweep.needs if sweep else SweepNeeds())
            tracking.log_result(run_id, job, result)
    except Exception as error:  # noqa: BLE001 - logged as FAILED; the sweep goes on
        MODELS.clear()
        log.error(f"job {name} FAILED: {one_line(error)}")
        if sweep_dir is None:
            raise JobFailed() from None  # said above
        return outcome.ended("FAILED", one_line(error))
    shown: set[str] = set()
    for sample in result.samples:
        for prompt, output in sample.sequences or ((sample.prompt, sample.output),):
            if sample.repetition == 0 and prompt not in shown:  # a prompt cycled into a batch is shown once
                shown.add(prompt)
                print(f"\n[{job.config.mode}] Q: {prompt}\nA: {output.strip()}", flush=True)
    log.info(f"run {name} FINISHED in {store.shown_uri()} (experiment {job.config.tracking.experiment}, run {run_id})")
    return outcome.ended("FINISHED")

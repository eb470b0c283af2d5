"""A sweep (`-m`): one parent run in MLflow, what its jobs share, and its end.

The callback resolves every job before any runs (bad input in any job stops the sweep with one
line, exit 2), opens the parent run and writes the sweep file every job reads, in this process or
another (joblib, SLURM). Every job leaves its outcome in the sweep folder, so that the end knows
about jobs that could not log a run (the store unreachable) or never reported (SIGKILL); the end
closes the parent run, prints the summary, and exits 1 if any job failed. Light to import: the
inference stack loads only once a sweep really starts.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from falcon_exp import lifecycle, resume, store, summary
from falcon_exp.checks import writable_folder
from falcon_exp.cli import override_key
from falcon_exp.config import JobConfig
from falcon_exp.console import log, one_line, say_error
from falcon_exp.errors import ConfigError, JobFailed
from falcon_exp.failures import ending
from falcon_exp.records import SweepNeeds

if TYPE_CHECKING:
    from falcon_exp.job import Job

SWEEP_FILE = "falcon_exp_sweep.json"
OUTCOMES = "falcon_exp_jobs"  # in the sweep folder: one file per job, named by its number
SUCCEEDED = ("FINISHED", "SKIPPED")


@dataclass(frozen=True)
class Sweep:
    """What the jobs of a sweep share, in whatever process or machine runs them (joblib, SLURM),
    through a file in the sweep folder: the parent run; the override keys whose values differ
    between jobs (they name the child runs); what the jobs need of the quality reference."""

    parent_run_id: str
    varying: tuple[str, ...]
    needs: SweepNeeds
    repeats: dict[str, str] = dataclasses.field(default_factory=dict)  # job number -> the earlier job it measures again

    def save(self, sweep_dir: Path) -> None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def of(cls, sweep_dir: Path) -> Sweep | None:
        path = sweep_dir / SWEEP_FILE
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return cls(raw["parent_run_id"], tuple(raw["varying"]), SweepNeeds(**raw["needs"]), raw.get("repeats", {}))


def job_label(overrides: list[str], varying: tuple[str, ...]) -> str:
    """A job's name: those of its overrides whose keys vary within its sweep (`bits=4`), or all of
    them outside a sweep."""
    return ",".join(o for o in overrides if not varying or override_key(o) in varying)


def repeated_jobs(jobs: list[Job], labels: list[str]) -> dict[str, str]:
    """The jobs that measure exactly what an earlier job of the sweep measures (bits=16 in a sweep
    over backends or 4-bit types): job number -> the earlier job's name."""
    first: dict[str, str] = {}
    repeats = {}
    for number, (job, label) in enumerate(zip(jobs, labels)):
        if (earlier := first.setdefault(job.measured, label)) != label:
            repeats[str(number)] = earlier
    return repeats


def hydra_folder(key: str, folder: Path) -> None:
    """The folder Hydra writes a job's or a sweep's files to (`key`) can be written."""
    writable_folder(f"{key}={str(folder)!r}", folder, f"run falcon-exp from a writable folder, or give {key}=A_WRITABLE_FOLDER "
                    "(and MLFLOW_TRACKING_URI, whose default store is ./mlruns)")


def record_outcome(sweep_dir: Path, job_num: int, name: str, status: str, run_id: str | None, why: str | None = None) -> None:
    """How a job of the sweep ended, where the process that closes the sweep finds it."""
    folder = sweep_dir / OUTCOMES
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{job_num}.json").write_text(json.dumps({"name": name, "status": status, "run_id": run_id, "why": why}))


def outcomes(sweep_dir: Path, jobs: int) -> tuple[list[str], list[str]]:
    """What the sweep's jobs left: one line per job that did not finish (FAILED or KILLED, with
    its run if it has one or the reason there is none, or gone without reporting), and the runs
    of earlier sweeps that stand for the jobs resume=true skipped."""
    failed, reused = [], []
    for num in range(jobs):
        path = sweep_dir / OUTCOMES / f"{num}.json"
        if not path.is_file():
            failed.append(f"job {num}: ended without reporting an outcome (killed?)")
            continue
        outcome = json.loads(path.read_text())
        if outcome["status"] not in SUCCEEDED:
            where = f"run {outcome['run_id']}" if outcome["run_id"] else f"no run: {outcome['why']}"
            failed.append(f"{outcome['name']}: {outcome['status']} ({where})")
        elif outcome["status"] == "SKIPPED" and outcome["run_id"]:
            reused.append(outcome["run_id"])
    return failed, reused


def varying_keys(jobs: list[list[str]]) -> tuple[str, ...]:
    """The override keys whose value is not the same in every job, in command-line order."""
    values: dict[str, set[str]] = {}
    for overrides in jobs:
        for override in overrides:
            values.setdefault(override_key(override), set()).add(override.partition("=")[2])
    return tuple(key for key, seen in values.items() if len(seen) > 1)


_OPEN: list[str] = []  # the parent run this process opened and has not closed


def opened_here(parent_run_id: str) -> bool:
    """Whether this process opened the sweep (its jobs run here, one after the other)."""
    return parent_run_id in _OPEN


def close_open_sweep(why: str, status: str = "KILLED") -> bool:
    """End the sweep this process opened and could not finish (KILLED by a signal, FAILED by an
    error), with its jobs' runs that are still RUNNING; returns whether it closed one."""
    closed = False
    while _OPEN:
        parent = _OPEN.pop()
        try:
            lifecycle.end_sweep_early(parent, status, why)
            closed = True
        except Exception as error:  # noqa: BLE001 - the store is gone too: say so, in one line
            say_error(f"could not close the sweep's run {parent}: {one_line(error)}")
    return closed


class SweepCallback(Callback):
    """Before a sweep: resolve every job and open the parent run. After: close it, print the
    summary, exit 1 if any job failed."""

    parent: str | None = None
    jobs = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        loader = GlobalHydra.instance().config_loader()
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(list(config.hydra.overrides.task))
        jobs = [list(o) for batch in BasicSweeper.split_arguments(parsed, None) for o in batch]
        with ending(close_open_sweep):  # Hydra turns a callback's exception into a warning and goes on: a sweep stops here
            self._start(config, jobs, [loader.load_sweep_config(config, o) for o in jobs])

    def _start(self, config: DictConfig, jobs: list[list[str]], configs: list[DictConfig]) -> None:
        hydra_folder("hydra.sweep.dir", Path(config.hydra.sweep.dir))
        for job_config in configs:  # cheap checks of every job first: a bad value fails in a second
            JobConfig.from_hydra(job_config)
        from falcon_exp.console import quiet_third_party
        from falcon_exp.job import resolve

        quiet_third_party()
        resolved = [resolve(c) for c in configs]
        store.check()
        self.jobs = len(jobs)
        experiments = {job.config.tracking.experiment for job in resolved}
        if len(experiments) > 1:
            raise ConfigError(f"tracking.experiment takes one value per sweep, not {sorted(experiments)}")
        varying = varying_keys(jobs)
        repeats = repeated_jobs(resolved, [job_label(o, varying) for o in jobs])
        common = {override_key(o): o.partition("=")[2] for o in jobs[0] if override_key(o) not in varying}
        name = "sweep " + (" ".join(config.hydra.overrides.task) or "defaults")
        sweep_dir = Path(config.hydra.sweep.dir)
        if (other := Sweep.of(sweep_dir)) and lifecycle.run_status(other.parent_run_id) == "RUNNING":
            raise ConfigError(f"hydra.sweep.dir={str(sweep_dir)!r} holds the sweep file of sweep {other.parent_run_id}, which is "
                              "still RUNNING; two sweeps must not share a folder: give each its own hydra.sweep.dir")
        needs = SweepNeeds(longest_new_tokens=max(max(job.prompts.new_tokens) for job in resolved),
                           stops_early=any(not job.config.force_length for job in resolved))
        try:
            if any(job.config.resume for job in resolved):
                for closed in resume.close_orphan_sweeps(next(iter(experiments))):
                    log.warning(f"closed {closed} as FAILED: it was left RUNNING by a process that is gone")
            self.parent = lifecycle.start_sweep_run(experiments.pop(), name, sweep_dir, common | {"sweep.varying": ",".join(varying)})
            _OPEN.append(self.parent)
            Sweep(self.parent, varying, needs, repeats).save(sweep_dir)
        except Exception as error:  # noqa: BLE001 - the store or the disk failed: one line, and no run left RUNNING
            close_open_sweep(f"could not open the sweep: {one_line(error)}", "FAILED")
            raise JobFailed(f"could not open the sweep in {store.shown_uri()}: {one_line(error)}") from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with ending(close_open_sweep):
            hydra_folder("hydra.run.dir", Path(config.hydra.run.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent is None:
            return
        with ending(close_open_sweep):
            self._end(Path(config.hydra.sweep.dir))

    def _end(self, sweep_dir: Path) -> None:
        failed, reused = outcomes(sweep_dir, self.jobs)
        try:
            children = lifecycle.end_sweep_run(self.parent, failed, reused)
            _OPEN.remove(self.parent)
        except Exception as error:  # noqa: BLE001 - the store went away during the sweep
            raise JobFailed(f"could not close the sweep's run {self.parent} in {store.shown_uri()}: {one_line(error)}") from None
        summary.print_summary(children)
        if failed:
            print("\n".join(f"falcon-exp: {line}" for line in failed), file=sys.stderr)
            raise JobFailed(f"{len(failed)} of {self.jobs} jobs failed")

"""`falcon-exp [-m] key=value ...` (also `python -m falcon_exp`): compose the config with Hydra
and run the job, or with `-m` the sweep."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from falcon_exp.config import ConfigError, JobConfig, check_group_overrides, load_order, renamed_groups
from falcon_exp.console import EXIT_BAD_INPUT, fail, signal_number, stop_on_signals, stopped_by


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> str:
    try:
        JobConfig.from_hydra(cfg)  # cheap checks first: a bad value fails before the inference stack loads
    except ConfigError as error:
        fail(error, EXIT_BAD_INPUT)
    from falcon_exp.app import run_job

    return run_job(cfg)


def cli() -> None:
    """The console command: a bad config group choice is one line before Hydra starts, and the
    overrides that decide which weights load go first, so a sweep loads each model once."""
    arguments, notices = renamed_groups(sys.argv[1:])
    for notice in notices:
        print(f"falcon-exp: notice: {notice}", file=sys.stderr, flush=True)
    try:
        check_group_overrides(arguments)
    except ConfigError as error:
        fail(error, EXIT_BAD_INPUT)
    sys.argv[1:] = load_order(arguments)
    stop_on_signals()
    try:
        main()
    except KeyboardInterrupt as error:  # Ctrl-C, SIGTERM, SIGHUP: the runs are KILLED in MLflow; one line, no traceback
        from falcon_exp.sweep import close_open_sweep

        name = stopped_by(error)
        close_open_sweep(f"stopped by {name}")
        print(f"falcon-exp: stopped by {name}; the running job and its sweep are KILLED in MLflow "
              "(resume=true re-runs what did not finish)", file=sys.stderr, flush=True)
        sys.exit(128 + signal_number(error))


if __name__ == "__main__":
    cli()

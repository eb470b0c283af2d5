"""`falcon-exp [-m] key=value ...` (also `python -m falcon_exp`): compose the config with Hydra
and run the job, or with `-m` the sweep."""

from __future__ import annotations

import os
import sys

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from falcon_exp.cli import check_checkpoint_overrides, check_group_overrides, integral_bits, load_order
from falcon_exp.compat import renamed_groups, renamed_keys
from falcon_exp.config import JobConfig
from falcon_exp.console import quiet_third_party, stop_on_signals
from falcon_exp.errors import ConfigError
from falcon_exp.failures import ending
from falcon_exp.sweep import close_open_sweep


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> str:
    with ending():
        JobConfig.from_hydra(cfg)  # cheap checks first: a bad value fails before the inference stack loads
        from falcon_exp.app import run_job

        return run_job(cfg)


def cli() -> None:
    """The console command: checks that need only the arguments are one line before Hydra starts,
    Hydra's own refusals (an unknown key, a malformed override) are one line too, and the overrides
    that decide which weights load go first, so a sweep loads each model once."""
    quiet_third_party()  # before the inference stack is imported: its import-time warnings say nothing of a run
    with ending(close_open_sweep):
        arguments, notices = renamed_groups(sys.argv[1:])
        arguments, renamed = renamed_keys(arguments)
        for notice in notices + renamed:
            print(f"falcon-exp: notice: {notice}", file=sys.stderr, flush=True)
        check_group_overrides(arguments)
        check_checkpoint_overrides(arguments)
        sys.argv[1:] = load_order(integral_bits(arguments))
        stop_on_signals()
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's errors come back here rather than being printed as a screenful
        try:
            main()
        except CompactHydraException as error:  # what Hydra itself takes for the user's mistake
            cause = f" ({str(error.__cause__).splitlines()[0]})" if error.__cause__ and str(error.__cause__) else ""
            raise ConfigError(f"{' '.join(str(error).split())}{cause}; `falcon-exp --help` lists the keys") from None


if __name__ == "__main__":
    cli()

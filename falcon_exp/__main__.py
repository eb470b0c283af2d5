"""`python -m falcon_exp [-m] key=value ...`: compose the config with Hydra and run the job(s)."""

import sys

import hydra

from falcon_exp.app import EXIT_BAD_INPUT, fail, run_job
from falcon_exp.config import ConfigError, check_group_overrides, load_order


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg) -> str:
    return run_job(cfg)


if __name__ == "__main__":
    try:
        check_group_overrides(sys.argv[1:])
    except ConfigError as error:
        fail(error, EXIT_BAD_INPUT)
    sys.argv[1:] = load_order(sys.argv[1:])
    main()

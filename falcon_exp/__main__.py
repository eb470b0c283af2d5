"""`python -m falcon_exp [-m] key=value ...`: compose the config with Hydra and run the job(s)."""

import hydra

from falcon_exp.app import run_job


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg) -> str:
    return run_job(cfg)


if __name__ == "__main__":
    main()

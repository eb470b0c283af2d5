"""The packaged Hydra config (found as pkg://falcon_exp.conf, so a wheel runs as a checkout does)."""

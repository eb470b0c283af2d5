"""The provenance every run carries."""

from __future__ import annotations

import subprocess

from falcon_exp.environment import REPO, describe


def test_the_commit_comes_from_git_unless_the_environment_names_one(monkeypatch):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.delenv("FALCON_EXP_GIT_COMMIT", raising=False)
    tags = describe("cpu")
    assert tags["git.commit"] == head and tags["git.dirty"] in ("true", "false")
    # a copied tree whose .git is stale: the commit its runner names is the one that ran
    monkeypatch.setenv("FALCON_EXP_GIT_COMMIT", "0192655")
    assert describe("cpu")["git.commit"] == "0192655" and describe("cpu")["git.dirty"] == "unknown"

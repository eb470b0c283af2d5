"""The provenance every run carries."""

from __future__ import annotations

import subprocess
import sys

from falcon_exp.environment import REPO, describe


def test_the_commit_comes_from_git_unless_the_environment_names_one(monkeypatch):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.delenv("FALCON_EXP_GIT_COMMIT", raising=False)
    tags = describe("cpu")
    assert tags["git.commit"] == head and tags["git.dirty"] in ("true", "false")
    # a copied tree whose .git is stale: the commit its runner names is the one that ran
    monkeypatch.setenv("FALCON_EXP_GIT_COMMIT", "0192655")
    assert describe("cpu")["git.commit"] == "0192655" and describe("cpu")["git.dirty"] == "unknown"


def test_a_run_carries_one_commit_where_the_environment_names_it(monkeypatch):
    """MLflow's Version column (mlflow.source.git.commit) read the checkout's HEAD while git.commit
    read FALCON_EXP_GIT_COMMIT; the branch MLflow found belongs to that other commit."""
    from falcon_exp import schema
    from falcon_exp.lifecycle import source_tags

    monkeypatch.setattr(sys, "argv", [str(REPO / "falcon_exp" / "__main__.py")])  # MLflow finds the checkout's HEAD from here
    monkeypatch.delenv("FALCON_EXP_GIT_COMMIT", raising=False)
    assert source_tags(describe("cpu"))[schema.MLFLOW_GIT_COMMIT] == describe("cpu")[schema.TAG_GIT_COMMIT]
    monkeypatch.setenv("FALCON_EXP_GIT_COMMIT", "0192655")
    tags = source_tags(describe("cpu"))
    assert tags[schema.MLFLOW_GIT_COMMIT] == tags[schema.TAG_GIT_COMMIT] == "0192655" and schema.MLFLOW_GIT_BRANCH not in tags


def test_an_untracked_file_makes_the_tree_dirty(monkeypatch):
    """A new module beside the package changes what runs as surely as an edited one."""
    monkeypatch.delenv("FALCON_EXP_GIT_COMMIT", raising=False)
    extra = REPO / "falcon_exp" / "_untracked_by_test.py"
    extra.write_text("# made by tests/test_environment.py\n")
    try:
        assert describe("cpu")["git.dirty"] == "true"
    finally:
        extra.unlink()


def test_cpu_tags_name_what_they_hold():
    import os

    import torch

    tags = describe("cpu")
    assert tags["torch.threads"] == str(torch.get_num_threads()) and "cpu_count" not in tags
    assert int(tags["cpu.cores"]) == len(os.sched_getaffinity(0))
    assert tags["cpu.capability"] == torch.backends.cpu.get_cpu_capability()


def test_a_library_at_a_version_not_tested_is_said(monkeypatch):
    from falcon_exp import environment

    monkeypatch.setitem(environment.TESTED, "transformers", ("0.0.1",))
    (line,) = environment.untested_versions()
    assert line.startswith("transformers ") and line.endswith("(tested: 0.0.1)")
    assert describe("cpu")["falcon_exp.untested_versions"] == line


def test_the_tested_versions_are_the_constraints_files():
    from falcon_exp.environment import TESTED

    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line and not line.startswith("#"))
    for package, tested in TESTED.items():
        assert pins[package] in tested, package


def test_a_version_tag_names_what_provides_the_package(tmp_path):
    """MLflow's slimmer build (mlflow-skinny) and a checkout on PYTHONPATH (as on a lent GPU) are
    not absent. Run without site-packages, so only the distributions made here are installed."""
    import shutil
    import sys

    shutil.copytree(REPO / "falcon_exp", tmp_path / "falcon_exp")  # the package without its install's metadata
    (tmp_path / "mlflow").mkdir()
    (tmp_path / "mlflow" / "__init__.py").write_text("")
    (tmp_path / "mlflow_skinny-9.9.9.dist-info").mkdir()
    (tmp_path / "mlflow_skinny-9.9.9.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: mlflow-skinny\nVersion: 9.9.9\n")
    code = "from falcon_exp.environment import _version; print([_version(p) for p in ('mlflow', 'falcon-exp', 'torch')])"
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.stdout.strip() == "['9.9.9 (mlflow-skinny)', 'source tree', 'absent']"
    assert describe("cpu")["version.mlflow"][0].isdigit()  # here: the full mlflow, installed

"""One name, one place: every name the analysis reads is one that a run writes, and the analysis
reads MLflow without the inference stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, runs_of
from falcon_exp import backends, schema

ANALYSIS = REPO / "falcon_exp" / "analysis"
PREFIXES = (schema.SAMPLE, schema.REP_STD, schema.TASK_PREFIX, schema.DROPPED)  # parts of names, not names


def schema_names_read(path: Path) -> set[str]:
    """The names a module reads through the schema: each outermost `schema.X` or `schema.f(...)`
    expression, evaluated."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        target = node.func if isinstance(node, ast.Call) else node
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "schema":
            try:
                value = eval(compile(ast.Expression(node), str(path), "eval"), {"schema": schema})  # our own source
            except NameError:  # a name made from the runs' own columns (schema.stderr_of(column)): read where it exists
                return
            if isinstance(value, str) and value not in PREFIXES:
                found.add(value)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


@pytest.mark.slow
def test_every_name_the_analysis_reads_is_written_by_a_run(tiny_sweep):
    from falcon_exp.analysis import tables

    written = set()
    for run in runs_of(tiny_sweep.uri)[0]:  # the sweep's parent run and its jobs
        written |= set(run.data.metrics) | set(run.data.tags) | set(run.data.params)
    read = set().union(*(schema_names_read(p) for p in ANALYSIS.glob("*.py")))
    read |= {key + schema.REP_STD for key in tables.SPREAD}
    read |= {k for k in [*tables.KEYS, *tables.RESULT_COLUMNS] if k not in (tables.PEAK_GB, "run_id")  # params, by config key
             and not (k.startswith("quantization.") and not k.startswith(("quantization.bitsandbytes.", "quantization.backend")))}
    assert len(read) > 40
    unwritten = sorted(name for name in read - written if name not in schema.CONDITIONAL | backends.conditional())
    assert unwritten == [], f"the analysis reads names no run writes: {unwritten}"


def test_the_analysis_imports_no_inference_stack():
    """A laptop with no GPU stack makes the figures: importing the analysis (and its command)
    loads neither torch nor transformers nor bitsandbytes, in a fresh interpreter."""
    code = ("import sys, falcon_exp.analysis, falcon_exp.analysis.__main__, falcon_exp.tracking\n"
            "print(sorted(m for m in ('torch', 'transformers', 'bitsandbytes') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_tag_and_metric_names_are_written_in_the_schema_alone():
    """Outside falcon_exp/schema.py no string of the package is a tag or metric name, or names one
    in an MLflow filter (`tags.NAME`, `metrics.NAME`): they are read through the schema's names. A
    backend's own names are written in its module alone. One-word tags (host, cpu, device, python)
    are also ordinary words, and are left out."""
    names = {value: "schema.py" for key, value in vars(schema).items() if key.isupper() and isinstance(value, str)
             and ("." in value or "/" in value or "_" in value) and value not in PREFIXES}
    names |= {schema.version_tag("torch"): "schema.py"}
    for method in backends.REGISTRY.values():
        module = f"{type(method).__module__.rsplit('.', 1)[1]}.py"
        names |= {name: module for name in [*(m.key for m in method.metrics), *method.tags]}
    assert {schema.TAG_CONFIG_HASH, schema.TAG_GIT_COMMIT, schema.DECODE_MS_PER_TOKEN, schema.ROOFLINE_FRACTION} <= set(names)
    assert names["falcon_exp.bnb_cpu_kernel"] == "bitsandbytes.py"
    found = []
    for path in sorted((REPO / "falcon_exp").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
                written = [name for name in names if text == name or f"tags.{name}" in text or f"metrics.{name}" in text]
                found += [f"{path.relative_to(REPO)}:{node.lineno}: {text!r}" for name in written if path.name != names[name]]
    assert found == [], "names written outside where they are declared:\n" + "\n".join(found)


def test_no_module_outside_the_backends_names_a_backend_in_code():
    """Adding a method is one module in falcon_exp/backends/: no other module's code (its names,
    attributes and strings, docstrings and comments aside) names a backend or the package it imports."""
    words = {w for method in backends.REGISTRY.values() for w in (method.name, *method.packages)} | {"bnb"}
    found = []
    for path in sorted((REPO / "falcon_exp").rglob("*.py")):
        if "backends" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            text = (node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    else node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else "")
            found += [f"{path.relative_to(REPO)}:{node.lineno}: {text!r}" for word in words if word in text.lower()]
    assert found == [], "backends named outside falcon_exp/backends/:\n" + "\n".join(found)

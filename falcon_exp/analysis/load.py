"""MLflow -> pandas. The analysis reads only the tracking store, never the runner's internals.

Three frames, every column named as in MLflow (params by their dotted config key, metrics by
their metric key):
- runs: a row per usable run, its params, tags that matter and run-level metrics;
- samples: a row per run x prompt x repetition, from the `sample/...` metric histories
  (step = prompt_index * repetitions + repetition);
- tidy: a row per run x prompt: the run's columns and, per sample metric, the median over the
  repetitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from falcon_exp import compat, schema, store

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

BACKEND = "quantization.backend"  # a config key
MODE, SCHEME = schema.PARAM_MODE, schema.PARAM_SCHEME
REQUIRED_METRICS = (schema.DECODE_MS_PER_TOKEN, schema.GENERATE_S, schema.WEIGHTS_GB, schema.sample(schema.GENERATE_S),
                    schema.sample(schema.DECODE_MS_PER_TOKEN))
TAGS = (schema.TAG_MODEL, schema.TAG_WEIGHTS, schema.TAG_DEVICE, schema.TAG_DEVICE_NAME, schema.TAG_MODEL_REUSED,
        schema.TAG_DECODE_PATH, schema.TAG_FAST_FALLBACK, schema.TAG_GIT_COMMIT, schema.TAG_UNMEASURED, schema.TAG_ROOFLINE_WARNING,
        schema.TAG_NOISE, schema.TAG_READ_METHOD)


@dataclass
class Loaded:
    runs: pd.DataFrame
    samples: pd.DataFrame
    tidy: pd.DataFrame
    skipped: list[str]  # one line per run left out, saying why
    source: str  # what was read: the sweep's parent run, or the experiment
    parent_run_id: str | None  # the sweep's parent run, where one was read


def select_runs(uri: str, experiment: str, sweep: str | None = "latest", filter_string: str = "") -> tuple[list, str, str | None]:
    """The runs to analyse: a sweep's children (the latest sweep by default, or a parent run id),
    or with sweep=None every run of the experiment that is not a sweep's parent."""
    from mlflow.exceptions import MlflowException

    from falcon_exp.errors import FalconExpError

    store.check(uri, create=False)
    shown = store.shown_uri(uri)
    client = store.client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise FalconExpError(f"experiment {experiment!r} is not in {shown}; it has: {', '.join(names) or 'none'}")
    ids = [found.experiment_id]
    try:
        client.search_runs(ids, filter_string=filter_string, max_results=1)
    except MlflowException as error:
        raise FalconExpError(f"--filter {filter_string!r} is not an MLflow filter: {str(error).splitlines()[0]}; "
                             "e.g. \"params.bits = '4'\"") from None
    if sweep == "latest":
        parents = client.search_runs(ids, filter_string=f"tags.{schema.TAG_SWEEP_DIR} LIKE '%'", order_by=["attributes.start_time DESC"],
                                     max_results=1)
        sweep = parents[0].info.run_id if parents else None
    if sweep:
        try:
            parent = client.get_run(sweep)
        except MlflowException:
            raise FalconExpError(f"--sweep {sweep!r} is no run in {shown}; give a sweep's parent run id, 'latest' or 'all'") from None
        clause = f"tags.mlflow.parentRunId = '{sweep}'"
        runs = client.search_runs(ids, filter_string=" and ".join(filter(None, [clause, filter_string])), max_results=50000)
        reused = _reused(client, parent, filter_string)
        said = f"; {len(reused)} of them from earlier sweeps, standing for the jobs resume=true skipped" if reused else ""
        return runs + reused, f"sweep {parent.info.run_name!r} ({sweep}{said})", sweep
    runs = client.search_runs(ids, filter_string=filter_string, max_results=50000)
    return [r for r in runs if schema.TAG_SWEEP_DIR not in r.data.tags], f"experiment {experiment!r}", None


def _reused(client: MlflowClient, parent: Run, filter_string: str) -> list[Run]:
    """The runs of earlier sweeps that stand for the configurations a resumed sweep skipped."""
    ids = [i for key, value in sorted(parent.data.tags.items()) if key.startswith(schema.TAG_REUSED_RUNS) for i in value.split()]
    if not ids:
        return []
    quoted = ", ".join(f"'{i}'" for i in ids)
    clause = f"attributes.run_id IN ({quoted})"
    return client.search_runs([parent.info.experiment_id], filter_string=" and ".join(filter(None, [clause, filter_string])),
                              max_results=50000)


def load(uri: str, experiment: str = "falcon-exp", sweep: str | None = "latest", filter_string: str = "") -> Loaded:
    found, source, parent_run_id = select_runs(uri, experiment, sweep, filter_string)
    client = store.client(uri)
    rows, sample_rows, skipped = [], [], []
    for run in sorted(found, key=lambda r: (r.info.start_time, r.info.run_id)):
        name = run.info.run_name or run.info.run_id
        metrics = {compat.RENAMED_METRICS.get(k, k): v for k, v in run.data.metrics.items()}
        missing = [m for m in REQUIRED_METRICS if m not in metrics]
        if run.info.status != "FINISHED" or missing:
            why = f"status {run.info.status}" if run.info.status != "FINISHED" else f"no {', '.join(missing)}"
            skipped.append(f"{name} ({run.info.run_id}): {why}")
            continue
        row = {"run_id": run.info.run_id, "run_name": name, "start_time": run.info.start_time}
        row |= {k: _number(v) for k, v in run.data.params.items()}
        row |= {k: run.data.tags[k] for k in TAGS if k in run.data.tags}
        row |= {k: v for k, v in metrics.items() if not k.startswith((schema.SAMPLE, schema.DROPPED))}  # per sample, not per run
        rows.append(row)
        repetitions = int(run.data.params.get("repetitions", 1))
        per_step: dict[int, dict] = {}
        for key in sorted(k for k in run.data.metrics if k.startswith(schema.SAMPLE)):
            for point in client.get_metric_history(run.info.run_id, key):
                per_step.setdefault(point.step, {})[compat.RENAMED_METRICS.get(key, key)] = point.value
        for step, values in sorted(per_step.items()):
            sample_rows.append(
                {"run_id": run.info.run_id, "prompt_index": step // repetitions, "repetition": step % repetitions} | values
            )
    runs = _as_logged_today(pd.DataFrame(rows))
    samples = pd.DataFrame(sample_rows)
    tidy = _tidy(runs, samples)
    return Loaded(runs=runs, samples=samples, tidy=tidy, skipped=skipped, source=source, parent_run_id=parent_run_id)


def _as_logged_today(runs: pd.DataFrame) -> pd.DataFrame:
    """Backend and scheme for every run, earlier releases' settings under today's keys; the
    unquantized baseline (scheme none) has no backend, whatever `quantization.backend` its config held."""
    if runs.empty:
        return runs
    runs = compat.with_keys_added_in_03(compat.with_settings_under_backends(compat.with_backend_and_scheme(runs, BACKEND, SCHEME)))
    return runs.assign(**{BACKEND: runs[BACKEND].where(runs[SCHEME] != "none", "none")})


def _tidy(runs: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    if runs.empty or samples.empty:
        return pd.DataFrame()
    per_prompt = samples.drop(columns="repetition").groupby(["run_id", "prompt_index"], sort=True).median().reset_index()
    return runs.merge(per_prompt, on="run_id", how="inner")


def _number(value: str):
    """Params come back as strings; numbers become numbers so they sort and plot as such."""
    for cast in (int, float):
        try:
            return cast(value)
        except (TypeError, ValueError):
            pass
    return value

"""A finished job's records -> MLflow: its metrics (per sample, at its step, and the run's
figures), its tags and its generated texts; the analysis' files on a sweep's run. Metrics and
tags are named in falcon_exp/schema.py, with their units and meanings."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from falcon_exp import schema
from falcon_exp.records import JobResult
from falcon_exp.store import client as _client

if TYPE_CHECKING:
    from mlflow.entities import Metric

    from falcon_exp.job import Job


TASK_RESULTS = "lm_eval/results.json"  # lm-evaluation-harness's results (falcon_exp/tasks.py)


def _metrics_of(job: Job, result: JobResult) -> list[Metric]:
    """Every metric of a finished job: each sample's at step `prompt_index * repetitions +
    repetition` under `sample/<name>`, the tries the noise check replaced under
    `dropped/<name>` at step 0, 1, ..., and the run's figures at step 0."""
    from mlflow.entities import Metric

    now, reps = int(time.time() * 1000), job.config.repetitions
    points = [Metric(schema.sample(key), float(value), now, sample.prompt_index * reps + sample.repetition)
              for key, values in result.columns().items() for sample, value in zip(result.samples, values)]
    points += [Metric(key, float(value), now, step) for key, values in result.dropped_columns().items() for step, value in enumerate(values)]
    return points + [Metric(key, float(value), now, 0) for key, value in result.figures().items()]


def _tags_of(result: JobResult) -> dict[str, str]:
    tags = {
        schema.TAG_DECODE_PATH: result.decode_path,
        schema.TAG_MODEL_REUSED: str(result.load_s is None).lower(),
        schema.TAG_QUANTIZATION_REALISED: result.report.realised,
        schema.TAG_DEVICE: result.device,
        schema.TAG_READ_METHOD: result.bandwidth.read_method,
    }
    if result.noise.said:
        tags[schema.TAG_NOISE] = result.noise.said
    if result.fast_fallback:
        tags[schema.TAG_FAST_FALLBACK] = result.fast_fallback
    if result.inductor_options:
        tags[schema.TAG_INDUCTOR_OPTIONS] = result.inductor_options
    tags |= result.backend_tags
    if result.unmeasured:
        tags[schema.TAG_UNMEASURED] = "; ".join(f"{k}: {why}" for k, why in sorted(result.unmeasured.items()))
    above = [s.roofline_fraction for s in result.samples if s.roofline_fraction > 1]
    if above:
        tags[schema.TAG_ROOFLINE_WARNING] = (
            f"{len(above)} of {len(result.samples)} samples decode faster than the bandwidth floor allows (up to "
            f"{max(above):.3f}): the floor's bytes or bandwidth are wrong for this run"
        )
    return tags


def log_result(run_id: str, job: Job, result: JobResult) -> None:
    """Metrics, tags and generated texts of a finished job."""
    from mlflow.entities import RunTag

    client = _client()
    metrics = _metrics_of(job, result)
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _tags_of(result).items()])
    fields = ("prompt_tokens", "new_tokens", "generate_s", "ttft_ms", "decode_ms_per_token", "e2e_tokens_per_s")
    rows = [
        {"prompt_index": s.prompt_index, "repetition": s.repetition, "prompt": s.prompt, "output": s.output}
        | {n: getattr(s.timing, n) for n in fields}
        for s in result.samples
    ]
    per_token = [r | {"itl_ms": list(s.timing.itl_ms)} | ({"batch": [{"prompt": p, "output": o} for p, o in s.sequences]} if s.sequences else {})
                 for r, s in zip(rows, result.samples)]  # each decode step's time; in a batch, every sequence's text
    client.log_text(run_id, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_token), "generations.jsonl")
    client.log_table(run_id, {k: [r[k] for r in rows] for k in rows[0]}, "generations.json")
    if result.task_results is not None:
        client.log_text(run_id, result.task_results, TASK_RESULTS)


def log_figures(run_id: str, paths: list[Path]) -> None:
    """Attach the analysis' files to a sweep's parent run."""
    client = _client()
    for path in paths:
        client.log_artifact(run_id, str(path), "analysis")

"""Standard tasks through lm-evaluation-harness (`pip install "falcon-exp[eval]"`), run on the
model the job has already loaded, in the quantization it verified: wrapped, never loaded again.

`quality.tasks` names lm-eval's registered tasks, or YAML files of tasks of one's own; only when a
name is given does lm-eval index its thousands of bundled tasks (and a dataset may then come from
the hub). Each task's metrics and their standard errors are logged as
`quality/task/<task>/<metric>` (lm-eval's keys, `acc,none`, carry commas MLflow refuses; a
filter other than `none` stays in the name, `acc.strict-match`), and lm-eval's results (what its
evaluator returns, with a `config` block as its command line writes one: model, tasks, limit,
batch size, bootstrap iterations) as the run's artifact `lm_eval/results.json`.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

from transformers import PreTrainedModel

from falcon_exp import schema
from falcon_exp.job import Job

BOOTSTRAP_ITERS = 1000  # lm-eval's resamples for metrics whose standard error has no closed form


def evaluate(model: PreTrainedModel, job: Job) -> tuple[dict[str, float], str]:
    """Every task's metrics by metric name, and lm-eval's results as JSON text."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    quality = job.config.quality
    named = [t for t in quality.tasks if not t.endswith((".yaml", ".yml"))]
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warnings about being handed a model are what we do on purpose
    try:
        model.tie_weights = lambda *args, **kwargs: None  # HFLM re-ties the head to the embedding; leave the loaded model as it is
        try:
            # a copy of the tokenizer: HFLM sets a pad token on it, and the job's is shared by the sweep's jobs
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(job.prompts.tokenizer), backend="causal", batch_size=quality.task_batch_size,
                      softmax_dtype="float32")
        finally:
            del model.tie_weights
        tasks = TaskManager(include_defaults=bool(named)).load([str(Path(t).resolve()) if t not in named else t for t in quality.tasks])
        results = evaluator.evaluate(lm=lm, task_dict=tasks, limit=quality.limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False,
                                     verbosity="ERROR")
    finally:
        quiet.setLevel(level)
    results["config"] = {"model": job.config.model.name, "mode": job.config.mode, "tasks": list(quality.tasks), "limit": quality.limit,
                         "batch_size": quality.task_batch_size, "bootstrap_iters": BOOTSTRAP_ITERS, "num_fewshot": "the tasks' own"}
    return metrics_of(results["results"]), json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)


def metrics_of(results: dict[str, dict]) -> dict[str, float]:
    """lm-eval's per-task results under names MLflow takes; values it could not compute ("N/A") left out."""
    metrics = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filtered = key.split(",", 1)
            name = metric if filtered == "none" else f"{metric}.{filtered}"
            metrics[schema.task_metric(_safe(task), _safe(name))] = float(value)
    return metrics


def _safe(name: str) -> str:
    """MLflow takes letters, digits, `_ - . / :` and spaces in a name: anything else becomes `_`."""
    return re.sub(r"[^\w\-. /:]", "_", name)

"""lm-evaluation-harness tasks on the model a job loaded: a task the test defines from a local file,
offline, without lm-eval indexing its bundled tasks; logged under names MLflow takes."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import QUICK, resolve_job
from falcon_exp import schema, tasks
from falcon_exp.errors import ConfigError

QUESTIONS = [
    ("What colour is the sky on a clear day?", ["blue", "green", "red"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten"], 1),
    ("Which is a fruit?", ["carrot", "apple", "potato"], 1),
    ("What is two plus two?", ["three", "five", "four"], 2),
    ("Which animal barks?", ["dog", "cat", "cow"], 0),
    ("What do bees make?", ["milk", "honey", "silk"], 1),
]
TASK = """task: falcon_exp_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""


@pytest.fixture
def local_task(tmp_path, monkeypatch):
    """A multiple-choice task of six questions from a JSON-lines file, the hub out of reach."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in QUESTIONS))
    path = tmp_path / "mc.yaml"
    path.write_text(TASK.format(data=data))
    return path


def test_a_local_task_runs_on_the_loaded_quantized_model_and_is_logged(local_task, store, monkeypatch, tmp_path):
    from mlflow import MlflowClient

    from falcon_exp import runner
    from falcon_exp.analysis import analyse
    from falcon_exp.lifecycle import job_run
    from falcon_exp.quality import EVAL_TEXTS
    from falcon_exp.tracking import TASK_RESULTS, log_result

    monkeypatch.setenv("FALCON_EXP_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "corpus.txt"
    text.write_text(EVAL_TEXTS["en"].read_text(encoding="utf-8"), encoding="utf-8")
    job = resolve_job(*QUICK, "quality.enabled=true", f"quality.tasks=[{local_task}]", "quality.limit=4", f"quality.corpus={text}",
                      "quality.corpus_context=64", "quality.corpus_stride=32", "quality.corpus_tokens=200", "quality.kl_tokens=100")
    result = runner.run(job)
    acc, stderr_key = schema.task_metric("falcon_exp_mc", "acc"), schema.task_metric("falcon_exp_mc", "acc_stderr")
    assert schema.stderr_of(acc) == stderr_key
    assert result.quality[acc] in (0, 0.25, 0.5, 0.75, 1) and result.quality[stderr_key] >= 0  # four examples
    assert result.report.realised == "4bit"
    written = json.loads(result.task_results)
    assert written["results"]["falcon_exp_mc"]["acc,none"] == result.quality[acc] and written["n-samples"]["falcon_exp_mc"]["effective"] == 4
    with job_run(job, "tasks", {}, "", parent_run_id=None, output_dir=None) as run_id:
        log_result(run_id, job, result)
    client = MlflowClient(store)
    assert client.get_run(run_id).data.metrics[acc] == result.quality[acc]
    assert json.loads(open(client.download_artifacts(run_id, TASK_RESULTS, str(tmp_path))).read()) == written
    assert client.get_run(run_id).data.metrics[schema.CORPUS_KL_TOKENS] == 100

    analyse(store, tmp_path / "figures", sweep=None)  # the task's score and the corpus KL, with their standard errors
    table = (tmp_path / "figures" / "comparison.md").read_text().splitlines()
    assert "falcon_exp_mc/acc" in table[0] and "corpus KL" in table[0]
    stderr = client.get_run(run_id).data.metrics[schema.CORPUS_KL_MEAN_STDERR]
    assert f" ± {stderr:.2g} |" in table[2] and f" ± {result.quality[stderr_key]:.2g} |" in table[2]
    assert (tmp_path / "figures" / "task_vs_memory.png").is_file() and (tmp_path / "figures" / "quality_vs_memory.png").is_file()


def test_lm_eval_keys_become_names_mlflow_takes():
    found = tasks.metrics_of({"gsm8k|x": {"alias": "gsm8k", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
                                          "word_perplexity,none": 12.0, "word_perplexity_stderr,none": "N/A", "acc,none": True}})
    assert found == {"quality/task/gsm8k_x/exact_match.strict-match": 0.5, "quality/task/gsm8k_x/exact_match_stderr.strict-match": 0.1,
                     "quality/task/gsm8k_x/word_perplexity": 12.0}


def test_tasks_without_lm_eval_or_with_a_missing_file_are_refused_in_one_line(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=f"^quality.tasks='{tmp_path}/none.yaml' cannot be read as UTF-8 text"):
        resolve_job("model=tiny-falcon", f"quality.tasks=[{tmp_path}/none.yaml]")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"^quality.tasks=\['arc_easy'\] needs lm-evaluation-harness, which is not installed: "
                                          r'pip install "falcon-exp\[eval\]"$'):
        resolve_job("model=tiny-falcon", "quality.tasks=[arc_easy]")

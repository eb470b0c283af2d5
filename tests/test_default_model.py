"""The packaged default model, end to end: fetched by the project's own code, quantized for real,
answering the article's prompts coherently in 4-bit and 8-bit on a CPU."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, runs_of

pytestmark = pytest.mark.slow
COMMON_WORDS = {"the", "a", "an", "to", "and", "of", "is", "in", "you", "your", "with", "for", "that", "it", "this", "are", "on", "be"}
TOPICS = [("magic", "mystic", "wizard", "wish", "story", "once"), ("vacation", "destination", "travel", "beach", "island", "paradise", "choice"),
          ("smartphone", "classroom", "student"), ("ice cream", "flavor", "flavour"), ("test", "a/b")]


def test_default_model_answers_the_five_prompts_in_4_and_8_bits(tmp_path, store):
    """The five prompts in one batch: every sequence of a left-padded batch answers its own prompt."""
    done = run_cli("-m", "bits=4,8", "batch_size=5", "repetitions=1", "warmup=0", "max_length=null", "max_new_tokens=40",
                   "quality.enabled=false", "noise.reruns=0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs, client = runs_of(store)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [c.data.params["mode"] for c in children] == ["nf4", "int8"]
    for child in children:
        assert child.info.status == "FINISHED" and child.data.params["model.name"] == "smollm2-135m-instruct"
        assert child.data.metrics["quant/quantized_layers"] == 30 * 7  # every projection of 30 layers
        path = client.download_artifacts(child.info.run_id, "generations.jsonl", str(tmp_path / child.info.run_id))
        (batch,) = [json.loads(line)["batch"] for line in open(path)]
        answers = [sequence["output"].lower() for sequence in batch]
        assert len(answers) == 5 and child.data.params["batch_size"] == "5"
        # coherent English, not noise: every answer is built of common English words, and most
        # name their prompt's subject (a story may open on the moon rather than on magic)
        for answer in answers:
            words = set(answer.replace(",", " ").replace(".", " ").split())
            assert len(words & COMMON_WORDS) >= 3 and len(answer.split()) >= 10, answer
        on_topic = sum(any(t in answer for t in topic) for answer, topic in zip(answers, TOPICS))
        assert on_topic >= 3, answers
    weights = [c.data.metrics["memory/weights_gb"] for c in children]
    assert weights[0] < weights[1]
    assert "[nf4] Q: What are the steps to perform an A/B test?" in done.stdout

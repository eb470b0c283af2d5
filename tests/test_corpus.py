"""Perplexity on a corpus and KL statistics, on a real tiny Falcon: the reference's perplexity is
transformers' own sliding-window recipe's, and the KL over the reference's top tokens is a lower
bound on the full one."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import resolve_job
from falcon_exp import corpus, schema
from falcon_exp.errors import ConfigError
from falcon_exp.models import MODELS
from falcon_exp.quality import EVAL_TEXTS

WINDOW = ("quality.corpus_context=64", "quality.corpus_stride=24", "quality.corpus_tokens=300", "quality.kl_tokens=200")


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(EVAL_TEXTS["en"].read_text(encoding="utf-8"), encoding="utf-8")
    return path


def transformers_recipe(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """transformers' documentation, "Perplexity of fixed-length models", as written there."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


def test_the_references_corpus_perplexity_is_transformers_sliding_window_recipes(text, monkeypatch, tmp_path):
    monkeypatch.setenv("FALCON_EXP_CACHE", str(tmp_path / "cache"))
    job = resolve_job("model=tiny-falcon", "bits=4", f"quality.corpus={text}", *WINDOW)
    ref = corpus.reference(job)
    model = MODELS.get(job.unquantized())[0].model
    ids = torch.tensor([corpus.corpus_ids(job)])
    assert len(ref.nll) == 299  # every token but the first, once
    ours = math.exp(ref.nll.mean().item())
    assert ours == pytest.approx(transformers_recipe(model, ids, 64, 24), rel=0.01)
    # the same model as a run: its own reference, to the last digit
    same = corpus.measure(model, job, ref)
    assert same[schema.CORPUS_PERPLEXITY] == ours and same[schema.CORPUS_PERPLEXITY_RATIO] == 1
    assert same[schema.CORPUS_KL_MEAN] == same[schema.CORPUS_KL_MAX] == same[schema.CORPUS_DELTA_P_RMS] == 0
    assert same[schema.CORPUS_SAME_TOP] == 1 and same[schema.CORPUS_KL_TOKENS] == 200 and same[schema.CORPUS_TOKENS] == 299
    assert corpus.reference(job).nll.equal(ref.nll)  # read back from the cache, keyed by the corpus's content


def test_kl_statistics_of_a_4_bit_run_bound_the_full_kl_from_below(text, monkeypatch, tmp_path):
    monkeypatch.setenv("FALCON_EXP_CACHE", str(tmp_path / "cache"))
    job = resolve_job("model=tiny-falcon", "bits=4", f"quality.corpus={text}", *WINDOW)
    ref = corpus.reference(job)
    reference_model = MODELS.get(job.unquantized())[0].model
    full_ref = torch.cat([lp for lp, _ in corpus._scored(reference_model, corpus.corpus_ids(job), job.config.quality)])[:200]
    run = MODELS.get(job)[0].model
    found = corpus.measure(run, job, ref)
    full_run = torch.cat([lp for lp, _ in corpus._scored(run, corpus.corpus_ids(job), job.config.quality)])[:200]
    full_kl = (full_ref.exp() * (full_ref - full_run)).sum(-1)
    assert 0 < found[schema.CORPUS_KL_MEAN] <= full_kl.mean().item()
    assert found[schema.CORPUS_KL_MEDIAN] <= found[schema.CORPUS_KL_P99] <= found[schema.CORPUS_KL_MAX]
    assert 0 < found[schema.CORPUS_KL_MEAN_STDERR] < found[schema.CORPUS_KL_MEAN]
    assert 0 < found[schema.CORPUS_SAME_TOP] < 1 and found[schema.CORPUS_SAME_TOP_STDERR] > 0
    assert found[schema.CORPUS_DELTA_P_RMS] >= abs(found[schema.CORPUS_DELTA_P_MEAN])
    assert found[schema.CORPUS_PERPLEXITY_RATIO] == found[schema.CORPUS_PERPLEXITY] / math.exp(ref.nll.mean().item())


def test_windows_score_each_token_once_and_all_that_have_context():
    """Overlapping windows score every token but the text's first; non-overlapping ones (stride =
    context, as published tables use) cannot score a window's first token either."""
    for length, context, stride in ((300, 64, 24), (300, 64, 64), (10, 64, 32), (65, 64, 1)):
        found = corpus.windows(length, context, stride)
        scored = [t for _, end, first in found for t in range(first, end)]
        unscored = {0} | ({begin for begin, _, _ in found} if stride == context else set())
        assert scored == sorted(set(range(length)) - unscored), (length, context, stride)
        assert all(end - begin <= context and first > begin for begin, end, first in found)


@pytest.mark.parametrize("overrides, says", [
    (("quality.corpus=/nonexistent/c.txt",), "^quality.corpus='/nonexistent/c.txt' cannot be read as UTF-8 text"),
    (("quality.corpus_stride=2048",), "^quality.corpus_stride=2048 is not allowed; it must be at most quality.corpus_context=1024"),
    (("quality.corpus={text}", "quality.corpus_context=100000"), "^quality.corpus_context=100000 runs past tiny-falcon's context of"),
    (("quality.corpus={text}", "quality.enabled=false"), "^quality.enabled=false but quality.corpus is set"),
    (("quality.corpus={short}",), "is shorter than two tokens: nothing to score$"),
])
def test_a_corpus_that_cannot_be_scored_is_refused_in_one_line_before_loading(overrides, says, text, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a")
    with pytest.raises(ConfigError, match=says):
        resolve_job("model=tiny-falcon", *(o.format(text=text, short=short) for o in overrides))


def test_the_corpus_text_not_its_path_is_in_the_jobs_identity(text):
    """resume=true must not reuse a run scored on a text since changed at the same path."""
    before = resolve_job("model=tiny-falcon", f"quality.corpus={text}").identity
    assert resolve_job("model=tiny-falcon", f"quality.corpus={text}").identity == before
    text.write_text(text.read_text() + " More.")
    assert resolve_job("model=tiny-falcon", f"quality.corpus={text}").identity != before

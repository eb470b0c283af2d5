"""Quality that can be set beside published tables: perplexity on a corpus the user names, and
KL statistics against the unquantized model over its tokens, as llama.cpp's perplexity tool
reports them.

Perplexity follows transformers' sliding-window recipe ("Perplexity of fixed-length models"):
the text read as UTF-8 and tokenised whole, with the tokenizer's own special tokens (a BOS where
the tokenizer adds one); windows of `quality.corpus_context` tokens moved by
`quality.corpus_stride`, each scoring only the tokens no earlier window scored, with the rest of
the window as their context; the exponential of the mean negative log-likelihood over every
scored token. The text's first token is never scored, and with non-overlapping windows
(stride = context, as the published tables of GPTQ and its successors use) neither is each
window's first.

KL statistics cover the first `quality.kl_tokens` scored tokens: KL(reference || run) of the
next-token distributions, the reference kept as its TOP_K most likely tokens' log-probabilities
(float32) with the rest of its mass as one more outcome. That is the KL of the two
distributions over those TOP_K + 1 outcomes: a lower bound on the full KL, close to it where
the reference's top tokens hold nearly all its mass. Reported: the mean with its standard
error, median, 99th percentile and max; delta-p, the run's probability of the reference's top
token minus the reference's, as mean and RMS; and how often the run's top token is the
reference's (a tie at the top counts as the same), with its standard error.

The reference's part (its per-token NLL, its top tokens) is cached on disk under a hash of the
corpus's content (not its path), the weights' identity, dtype, device, the window settings and
torch's and transformers' versions.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch
from transformers import PreTrainedModel

from falcon_exp import schema
from falcon_exp.cache import cache_dir, content_hash, replaced
from falcon_exp.config import QualityConfig
from falcon_exp.console import log
from falcon_exp.job import Job
from falcon_exp.models import MODELS

TOP_K = 128  # the reference's tokens kept per position for KL


@dataclass
class CorpusReference:
    nll: torch.Tensor  # the unquantized model's negative log-likelihood of every scored token, float32
    top_ids: torch.Tensor  # its TOP_K most likely next tokens at each of the first kl_tokens scored positions
    top_logprobs: torch.Tensor  # their log-probabilities, float32


def windows(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over `length` tokens: transformers'
    recipe, where a window scores the tokens from the previous window's end to its own."""
    found, previous_end = [], 0
    for begin in range(0, length, stride):
        end = min(begin + context, length)
        found.append((begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == length:
            break
    return found


def corpus_ids(job: Job) -> list[int]:
    quality = job.config.quality
    ids = job.prompts.tokenizer(Path(quality.corpus).read_text(encoding="utf-8"))["input_ids"]
    return list(ids[: quality.corpus_tokens] if quality.corpus_tokens else ids)


def _scored(model: PreTrainedModel, ids: list[int], quality: QualityConfig):
    """For every window: the log-probabilities at the positions that predict its scored tokens
    (float32, on the CPU), and those tokens."""
    device = next(model.parameters()).device
    for begin, end, first in windows(len(ids), quality.corpus_context, quality.corpus_stride):
        with torch.inference_mode():
            logits = model(torch.tensor([ids[begin:end]], device=device)).logits[0, first - 1 - begin : end - 1 - begin]
        yield torch.log_softmax(logits.float(), dim=-1).cpu(), torch.tensor(ids[first:end])


def reference_key(job: Job) -> str:
    quality = job.config.quality
    identity = {
        "corpus": hashlib.sha256(Path(quality.corpus).read_bytes()).hexdigest(),
        "settings": {k: v for k, v in asdict(quality).items() if k.startswith(("corpus_", "kl_"))},
        "top_k": TOP_K,
        "weights": job.weights.identity,
        "dtype": job.config.dtype,
        "device": job.device_identity,
        "versions": {p: metadata.version(p) for p in ("torch", "transformers")},
    }
    return content_hash(identity, 24)


def reference(job: Job) -> CorpusReference:
    """The unquantized model's part: from the disk cache, or computed now (loading the model in
    `dtype` through the shared model cache)."""
    path = cache_dir() / "reference" / f"corpus-{reference_key(job)}.pt"
    if path.is_file():
        return CorpusReference(**torch.load(path))
    log.info(f"scoring the corpus with the {job.config.dtype} reference (once; cached at {path})")
    model = MODELS.get(job.unquantized())[0].model
    nll, top_ids, top_logprobs, kept = [], [], [], job.config.quality.kl_tokens
    for logprobs, targets in _scored(model, corpus_ids(job), job.config.quality):
        nll.append(-logprobs.gather(-1, targets.unsqueeze(-1))[:, 0])
        if kept > 0:
            top = logprobs[:kept].topk(min(TOP_K, logprobs.shape[-1]), dim=-1)
            top_ids.append(top.indices.int())
            top_logprobs.append(top.values)
            kept -= len(top.values)
    result = CorpusReference(torch.cat(nll), torch.cat(top_ids), torch.cat(top_logprobs))
    with replaced(path) as staging:
        torch.save(asdict(result), staging)
    return result


def measure(model: PreTrainedModel, job: Job, ref: CorpusReference | None) -> dict[str, float]:
    """The run's corpus perplexity, and against the reference (where there is one) its ratio and
    the KL statistics."""
    nll, kl, delta_p, same_top = [], [], [], []
    for logprobs, targets in _scored(model, corpus_ids(job), job.config.quality):
        nll.append(-logprobs.gather(-1, targets.unsqueeze(-1))[:, 0])
        if ref is not None and (start := sum(len(n) for n in nll) - len(targets)) < len(ref.top_ids):
            ids, ref_lp = ref.top_ids[start : start + len(targets)].long(), ref.top_logprobs[start : start + len(targets)]
            run_lp = logprobs[: len(ids)]
            kl.append(bucketed_kl(ref_lp, run_lp.gather(-1, ids)))
            at_ref_top = run_lp.gather(-1, ids[:, :1])[:, 0]
            delta_p.append(at_ref_top.exp() - ref_lp[:, 0].exp())
            same_top.append((at_ref_top >= run_lp.max(-1).values).float())  # a tie for the top counts as the same
    run_nll = torch.cat(nll)
    metrics = {schema.CORPUS_PERPLEXITY: math.exp(run_nll.mean().item()), schema.CORPUS_TOKENS: len(run_nll)}
    if ref is None:
        return metrics
    metrics[schema.CORPUS_PERPLEXITY_RATIO] = metrics[schema.CORPUS_PERPLEXITY] / math.exp(ref.nll.mean().item())
    return metrics | kl_statistics(torch.cat(kl), torch.cat(delta_p), torch.cat(same_top))


def bucketed_kl(ref_top: torch.Tensor, run_at_ref_top: torch.Tensor) -> torch.Tensor:
    """KL(reference || run) per position over the reference's top tokens and one outcome for the
    rest of the vocabulary, from log-probabilities (positions x TOP_K)."""
    p, q = ref_top.exp(), run_at_ref_top.exp()
    p_rest, q_rest = (1 - p.sum(-1)).clamp(min=0), (1 - q.sum(-1)).clamp(min=torch.finfo(torch.float32).tiny)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=torch.finfo(torch.float32).tiny).log() - q_rest.log()), 0.0)
    return (p * (ref_top - run_at_ref_top)).sum(-1) + rest


def kl_statistics(kl: torch.Tensor, delta_p: torch.Tensor, same_top: torch.Tensor) -> dict[str, float]:
    """The statistics over the scored positions; standard errors where there are two or more."""
    n = len(kl)
    rate = same_top.mean().item()
    stderr = {schema.CORPUS_KL_MEAN_STDERR: kl.std().item() / math.sqrt(n), schema.CORPUS_SAME_TOP_STDERR: math.sqrt(rate * (1 - rate) / n)}
    return (stderr if n > 1 else {}) | {
        schema.CORPUS_KL_TOKENS: n,
        schema.CORPUS_KL_MEAN: kl.mean().item(),
        schema.CORPUS_KL_MEDIAN: kl.median().item(),
        schema.CORPUS_KL_P99: torch.quantile(kl, 0.99).item(),
        schema.CORPUS_KL_MAX: kl.max().item(),
        schema.CORPUS_DELTA_P_MEAN: delta_p.mean().item(),
        schema.CORPUS_DELTA_P_RMS: delta_p.square().mean().sqrt().item(),
        schema.CORPUS_SAME_TOP: rate,
    }

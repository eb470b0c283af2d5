"""What quantization costs in the text: every run against the same model unquantized (the
reference, in `dtype`), on numbers that do not depend on timing.

- perplexity on the shipped evaluation texts (English and Chinese), tokenised whole, cut to
  `quality.eval_tokens`, scored in non-overlapping windows of `quality.window` tokens;
- divergence, teacher-forced on the reference's own greedy continuations of the prompts
  (`quality.reference_tokens` forced tokens each): mean KL(reference || run) of next-token
  distributions and top-1 agreement;
- how far the greedy text moved: the fraction of prompts whose continuation equals the
  reference's over the same span under the same stopping rule, and the mean length of their
  common prefix in tokens.

The reference is cached on disk under a hash of everything its numbers depend on (the weights'
identity, dtype, the device it ran on, the prompts' token ids, the quality settings, the
evaluation texts, torch's and transformers' versions), so a `-m bits=4,8` sweep loads the
unquantized model once, or never again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from falcon_exp import schema
from falcon_exp.cache import cache_dir, content_hash, replaced
from falcon_exp.console import log
from falcon_exp.decode import each_alone
from falcon_exp.job import Job
from falcon_exp.models import MODELS

EVAL_TEXTS = {lang: Path(__file__).parent / "assets" / f"eval_{lang}.txt" for lang in schema.LANGUAGES}
PROMPT_QUALITY = ("enabled", "reference_tokens", "eval_tokens", "window")  # the settings this reference depends on (the corpus's: corpus.py)


def kl_divergence(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) per position, from log-probabilities over the last dimension."""
    return (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(-1)


def perplexity(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood of `targets` under per-position `logprobs`."""
    return math.exp(-logprobs.gather(-1, targets.unsqueeze(-1)).mean().item())


def _logprobs(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """Log-softmax of the next-token distribution at every position but the last, float32."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=device)).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def text_perplexity(model: PreTrainedModel, ids: list[int], window: int) -> float:
    """Non-overlapping windows; each window predicts its own tokens after the first."""
    logprobs, targets = [], []
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        logprobs.append(_logprobs(model, chunk))
        targets.append(torch.tensor(chunk[1:]))
    return perplexity(torch.cat(logprobs), torch.cat(targets))


def eval_ids(tokenizer: Any, lang: str, limit: int | None) -> list[int]:
    ids = tokenizer(EVAL_TEXTS[lang].read_text(encoding="utf-8"))["input_ids"]
    return list(ids[:limit] if limit else ids)


@dataclass
class Reference:
    forced: list[list[int]]  # the reference's greedy tokens after each prompt, end-of-sequence suppressed
    free: list[list[int]] | None  # its greedy tokens free to stop at end-of-sequence (which ends them), if asked for
    length: int  # tokens generated after each prompt (at most, for `free`)
    logprobs: list[torch.Tensor]  # next-token log-probabilities over the first `reference_tokens` forced tokens
    perplexity: dict[str, float]

    def serves(self, tokens: int, free: bool) -> bool:
        """Greedy text is prefix-consistent: a continuation of `length` tokens holds every shorter one."""
        return tokens <= self.length and (self.free is not None or not free)

    def text(self, index: int, tokens: int, force_length: bool) -> list[int]:
        """The reference's greedy continuation of one prompt under a run's stopping rule and span."""
        return (self.forced if force_length else self.free)[index][:tokens]


def reference_key(job: Job) -> str:
    """A hash of everything the reference's numbers depend on."""
    identity = {
        "weights": job.weights.identity,
        "dtype": job.config.dtype,
        "device": job.device_identity,
        "prompt_ids": [ids[0].tolist() for ids in job.prompts.input_ids],
        "quality": {k: v for k, v in dataclasses.asdict(job.config.quality).items() if k in PROMPT_QUALITY},
        "texts": {lang: hashlib.sha256(path.read_bytes()).hexdigest() for lang, path in EVAL_TEXTS.items()},
        "versions": {p: metadata.version(p) for p in ("torch", "transformers")},
    }
    return content_hash(identity, 24)


def score(model: PreTrainedModel, job: Job, continuations: list[list[int]]) -> tuple[list[torch.Tensor], dict[str, float]]:
    """A model's log-probabilities over given continuations, and its perplexity per language."""
    logprobs = []
    for prompt, continuation in zip(job.prompts.input_ids, continuations):
        full = prompt[0].tolist() + continuation
        logprobs.append(_logprobs(model, full)[prompt.shape[1] - 1 :])
    quality = job.config.quality
    perplexities = {
        lang: text_perplexity(model, eval_ids(job.prompts.tokenizer, lang, quality.eval_tokens), quality.window)
        for lang in EVAL_TEXTS
    }
    return logprobs, perplexities


def reference(job: Job, text_tokens: int, free: bool) -> Reference:
    """The unquantized model's continuations, log-probabilities and perplexities: from the disk
    cache, or computed now (loading the model in `dtype` through the shared model cache). Its
    greedy text runs to `text_tokens` (the longest continuation of the job's sweep) at least, and
    also free to stop at end-of-sequence where `free`, so that a sweep computes it once."""
    path = cache_dir() / "reference" / f"{reference_key(job)}.pt"
    if path.is_file() and (cached := Reference(**torch.load(path))).serves(text_tokens, free):
        return cached
    log.info(f"computing the {job.config.dtype} reference for quality metrics (once; cached at {path})")
    model = MODELS.get(job.unquantized())[0].model
    length = max(job.config.quality.reference_tokens, text_tokens)

    def greedy(force_length: bool) -> list[list[int]]:
        prompts = job.prompts.input_ids
        return each_alone(model, prompts, [length] * len(prompts), force_length, job.prompts.pad_token_id)

    forced = greedy(True)
    logprobs, perplexities = score(model, job, [c[: job.config.quality.reference_tokens] for c in forced])
    result = Reference(forced, greedy(False) if free else None, length, logprobs, perplexities)
    with replaced(path) as staging:
        torch.save(dataclasses.asdict(result), staging)
    return result


def common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def measure(model: PreTrainedModel, job: Job, ref: Reference, outputs: list[list[int]]) -> dict[str, float]:
    """Quality metrics of a run against the reference. `outputs`: the run's greedy tokens per
    prompt, compared with the reference's greedy tokens over the same span (the run's length for
    that prompt) under the same stopping rule (forced length, or free to stop at end-of-sequence)."""
    logprobs, perplexities = score(model, job, [c[: job.config.quality.reference_tokens] for c in ref.forced])
    kl = torch.cat([kl_divergence(r, q) for r, q in zip(ref.logprobs, logprobs)])
    top1 = torch.cat([(r.argmax(-1) == q.argmax(-1)).float() for r, q in zip(ref.logprobs, logprobs)])
    texts = [ref.text(i, n, job.config.force_length) for i, n in enumerate(job.prompts.new_tokens)]
    prefixes = [common_prefix(o, t) for o, t in zip(outputs, texts)]
    metrics = {
        schema.KL_MEAN: kl.mean().item(),
        schema.KL_MAX: kl.max().item(),
        schema.TOP1_AGREEMENT: top1.mean().item(),
        schema.GREEDY_MATCH: sum(o == t for o, t in zip(outputs, texts)) / len(texts),
        schema.COMMON_PREFIX_TOKENS: sum(prefixes) / len(prefixes),
    }
    for lang, value in perplexities.items():
        metrics[schema.perplexity(lang)] = value
        metrics[schema.perplexity_ratio(lang)] = value / ref.perplexity[lang]
    return metrics

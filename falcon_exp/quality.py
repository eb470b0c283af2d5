"""What quantization costs in the text: every run against the same model unquantized (the
reference, in `dtype`), on numbers that do not depend on timing.

- perplexity on the shipped evaluation texts (English and Chinese), tokenised whole, cut to
  `quality.eval_tokens`, scored in non-overlapping windows of `quality.window` tokens;
- divergence, teacher-forced on the reference's own greedy continuations of the prompts
  (`quality.reference_tokens` forced tokens each): mean KL(reference || run) of next-token
  distributions and top-1 agreement;
- how far the greedy text moved: the fraction of prompts whose continuation equals the
  reference's, and the mean length of their common prefix in tokens.

The reference is computed once per (model, dtype, prompts, quality settings) and cached on
disk, so a `-m bits=4,8` sweep loads the unquantized model once, or never again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from falcon_exp.config import JobConfig, QuantizationConfig
from falcon_exp.models import MODELS, cache_dir, say

EVAL_TEXTS = {lang: Path(__file__).parent / "assets" / f"eval_{lang}.txt" for lang in ("en", "zh")}


def kl_divergence(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) per position, from log-probabilities over the last dimension."""
    return (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(-1)


def perplexity(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood of `targets` under per-position `logprobs`."""
    return math.exp(-logprobs.gather(-1, targets.unsqueeze(-1)).mean().item())


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """Log-softmax of the next-token distribution at every position but the last, float32."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=device)).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def text_perplexity(model, ids: list[int], window: int) -> float:
    """Non-overlapping windows; each window predicts its own tokens after the first."""
    logprobs, targets = [], []
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        logprobs.append(_logprobs(model, chunk))
        targets.append(torch.tensor(chunk[1:]))
    return perplexity(torch.cat(logprobs), torch.cat(targets))


def eval_ids(tokenizer, lang: str, limit: int | None) -> list[int]:
    ids = tokenizer(EVAL_TEXTS[lang].read_text(encoding="utf-8"))["input_ids"]
    return list(ids[:limit] if limit else ids)


@dataclass
class Reference:
    continuations: list[list[int]]  # the reference's greedy tokens after each prompt
    logprobs: list[torch.Tensor]  # its next-token log-probabilities over those tokens
    perplexity: dict[str, float]


def _key(job: JobConfig) -> str:
    texts = {lang: hashlib.sha256(path.read_bytes()).hexdigest() for lang, path in EVAL_TEXTS.items()}
    identity = {
        "model": dataclasses.asdict(job.model),
        "seed": job.seed if job.model.weights == "synthetic" else None,
        "dtype": job.dtype,
        "device": job.device,
        "prompts": job.prompts.items,
        "quality": dataclasses.asdict(job.quality),
        "texts": texts,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _forced(model, prompt_ids: torch.Tensor, count: int, pad_token_id: int) -> list[int]:
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(prompt_ids.to(device), attention_mask=torch.ones_like(prompt_ids).to(device),
                             max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=pad_token_id)
    return out[0, prompt_ids.shape[1] :].tolist()


def score(model, job: JobConfig, prepared, continuations: list[list[int]]) -> tuple[list[torch.Tensor], dict[str, float]]:
    """A model's log-probabilities over given continuations, and its perplexity per language."""
    logprobs = []
    for prompt, continuation in zip(prepared.input_ids, continuations):
        full = prompt[0].tolist() + continuation
        logprobs.append(_logprobs(model, full)[prompt.shape[1] - 1 :])
    perplexities = {
        lang: text_perplexity(model, eval_ids(prepared.tokenizer, lang, job.quality.eval_tokens), job.quality.window)
        for lang in EVAL_TEXTS
    }
    return logprobs, perplexities


def reference(job: JobConfig, prepared) -> Reference:
    """The unquantized model's continuations, log-probabilities and perplexities: from the disk
    cache, or computed now (loading the model in `dtype` through the shared model cache)."""
    path = cache_dir() / "reference" / f"{_key(job)}.pt"
    if path.is_file():
        return Reference(**torch.load(path))
    baseline = dataclasses.replace(job, quantization=QuantizationConfig(bits=16))
    say(f"computing the {job.dtype} reference for quality metrics (once; cached at {path})")
    model = MODELS.get(baseline).model
    continuations = [_forced(model, ids, job.quality.reference_tokens, prepared.pad_token_id) for ids in prepared.input_ids]
    logprobs, perplexities = score(model, job, prepared, continuations)
    result = Reference(continuations, logprobs, perplexities)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(dataclasses.asdict(result), staging)
    os.replace(staging, path)
    return result


def common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def measure(model, job: JobConfig, prepared, ref: Reference, outputs: list[list[int]]) -> dict[str, float]:
    """Quality metrics of a run against the reference. `outputs`: the run's greedy tokens per
    prompt, compared with the reference's over their common length."""
    logprobs, perplexities = score(model, job, prepared, ref.continuations)
    kl = torch.cat([kl_divergence(r, q) for r, q in zip(ref.logprobs, logprobs)])
    top1 = torch.cat([(r.argmax(-1) == q.argmax(-1)).float() for r, q in zip(ref.logprobs, logprobs)])
    prefixes = [common_prefix(o, c) for o, c in zip(outputs, ref.continuations)]
    compared = [min(len(o), len(c)) for o, c in zip(outputs, ref.continuations)]
    metrics = {
        "quality/kl_mean": kl.mean().item(),
        "quality/kl_max": kl.max().item(),
        "quality/top1_agreement": top1.mean().item(),
        "quality/greedy_match": sum(p == n for p, n in zip(prefixes, compared)) / len(prefixes),
        "quality/common_prefix_tokens": sum(prefixes) / len(prefixes),
    }
    for lang, value in perplexities.items():
        metrics[f"quality/perplexity_{lang}"] = value
        metrics[f"quality/perplexity_{lang}_ratio"] = value / ref.perplexity[lang]
    return metrics

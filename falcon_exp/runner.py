"""One job: prompts x repetitions on one (cached) model -> plain records."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from falcon_exp import quality, roofline
from falcon_exp.config import ConfigError, JobConfig
from falcon_exp.decode import decoder_for
from falcon_exp.measure import MemoryProbe, Timing, timed_generate
from falcon_exp.models import MODELS, load_tokenizer, resolve_device, say
from falcon_exp.quantization import QuantizationReport


WARMUP_TOKENS = 8


@dataclass(frozen=True)
class Prepared:
    """Prompts as the model will see them; everything checkable before weights load."""

    tokenizer: object
    input_ids: tuple[torch.Tensor, ...]
    new_tokens: tuple[int, ...]
    pad_token_id: int


@dataclass(frozen=True)
class Sample:
    prompt_index: int
    repetition: int
    prompt: str
    output: str
    timing: Timing
    memory: dict[str, float]  # peaks during this generation alone
    roofline_fraction: float  # the bandwidth floor per token over the measured decode time


@dataclass
class JobResult:
    samples: list[Sample]
    memory: dict[str, float]  # peaks over all timed generations
    report: QuantizationReport
    load_s: float | None  # None when the model was reused from an earlier job
    device: str
    quality: dict[str, float]  # empty when quality.enabled is false
    decode_path: str  # eager, compiled_cuda_graph, cuda_graph or static_cache (falcon_exp/decode.py)
    fast_fallback: str | None  # why the fast path runs without compilation or without CUDA graphs
    roofline: dict[str, float]  # the floor's inputs: copy bandwidth, bytes per step


def encode(tokenizer, prompt: str, chat_template: bool) -> torch.Tensor:
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False)
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long)


def prepare(job: JobConfig) -> Prepared:
    """Tokenise every prompt and check that max_length leaves room to generate after each."""
    tokenizer = load_tokenizer(job.model)
    input_ids = tuple(encode(tokenizer, p, job.model.chat_template) for p in job.prompts.items)
    lengths = [ids.shape[1] for ids in input_ids]
    new_tokens = tuple(job.generation.new_tokens(n) for n in lengths)
    if min(new_tokens) < 1:
        longest = max(lengths)
        raise ConfigError(
            f"max_length={job.generation.max_length} leaves no room to generate: the longest prompt of "
            f"prompts={job.prompts.name} is {longest} tokens; allowed: max_length >= {longest + 1}, or set max_new_tokens"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Prepared(tokenizer=tokenizer, input_ids=input_ids, new_tokens=new_tokens, pad_token_id=pad)


def run(job: JobConfig, prepared: Prepared) -> JobResult:
    reused = MODELS.holds(job)
    bandwidth = roofline.copy_bandwidth(resolve_device(job.device))  # before the weights take the memory
    # the reference first: it may load the unquantized model, which must not evict this job's
    reference = quality.reference(job, prepared) if job.quality.enabled else None
    loaded = MODELS.get(job)
    device, model, tokenizer = loaded.device, loaded.model, prepared.tokenizer
    first_device = next(model.parameters()).device
    inputs = [ids.to(first_device) for ids in prepared.input_ids]
    longest = max(ids.shape[1] + n for ids, n in zip(inputs, prepared.new_tokens))
    decoder = decoder_for(model, job.generation.fast, longest, job.quantization, device, prepared.pad_token_id)
    if decoder.fallback:
        say(f"fast path as {decoder.path}: {decoder.fallback}")
    weights_step = roofline.weight_bytes_per_step(model)
    kv_per_token = roofline.kv_bytes_per_token(model, inputs[0])

    def generate(index: int) -> tuple[Timing, list[int]]:
        return timed_generate(decoder, inputs[index], prepared.new_tokens[index], job.generation.force_length, device)

    torch.manual_seed(job.seed)
    warmup_tokens = min(WARMUP_TOKENS, prepared.new_tokens[0])  # enough to run every code path once
    for _ in range(job.generation.warmup):
        timed_generate(decoder, inputs[0], warmup_tokens, job.generation.force_length, device)
    probe = MemoryProbe(device)
    samples = []
    generated_by_prompt: dict[int, list[int]] = {}  # each prompt's first timed continuation
    count = len(inputs)
    for repetition in range(job.generation.repetitions):  # repetitions outermost: drift spreads over prompts
        for index in range(count):
            probe.reset()
            timing, generated = generate(index)
            memory = probe.read()
            generated_by_prompt.setdefault(index, generated)
            output = tokenizer.decode(generated, skip_special_tokens=True)
            step = roofline.step_bytes(weights_step, kv_per_token, timing.prompt_tokens, timing.new_tokens)
            fraction = roofline.fraction(step, bandwidth, timing.decode_ms_per_token)
            samples.append(Sample(index, repetition, job.prompts.items[index], output, timing, memory, fraction))
            say(
                f"prompt {index + 1}/{count} rep {repetition + 1}/{job.generation.repetitions}: "
                f"{timing.new_tokens} tokens in {timing.generate_s:.2f} s ({timing.decode_ms_per_token:.1f} ms/token, "
                f"{fraction:.2f} of the bandwidth floor)"
            )
    samples.sort(key=lambda s: (s.prompt_index, s.repetition))
    peaks = {key: max(s.memory[key] for s in samples) for key in samples[0].memory}
    scores = {}
    if reference is not None:
        outputs = [generated_by_prompt[i] for i in range(count)]
        scores = quality.measure(model, job, prepared, reference, outputs)
    figures = {
        "roofline/copy_bandwidth_gbs": bandwidth / 1e9,
        "roofline/weight_bytes_per_step_gb": weights_step / 1e9,
        "roofline/kv_bytes_per_token": float(kv_per_token),
    }
    load_s = None if reused else loaded.load_s
    return JobResult(samples, peaks, loaded.report, load_s, device, scores, decoder.path, decoder.fallback, figures)

"""One job: prompts x repetitions on one (cached) model -> plain records."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from falcon_exp import quality, roofline
from falcon_exp.config import ConfigError, JobConfig
from falcon_exp.console import log
from falcon_exp.decode import decoder_for
from falcon_exp.measure import MemoryProbe, Timing, timed_generate
from falcon_exp.models import MODELS, load_tokenizer, resolve_device
from falcon_exp.quantization import QuantizationReport, cpu_kernel


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
    memory: dict[str, float]  # peaks during this generation alone, by metric name
    floor_ms_per_token: float  # bytes this generation's decode steps read / read bandwidth
    roofline_fraction: float  # that floor over the measured decode time


@dataclass(frozen=True)
class JobResult:
    samples: list[Sample]
    memory: dict[str, float]  # peaks over all timed generations, by metric name
    unmeasured: dict[str, str]  # metric -> why this run has no value for it
    report: QuantizationReport
    load_s: float | None  # None when the model was reused from an earlier job
    device: str
    quality: dict[str, float]  # empty when quality.enabled is false
    decode_path: str  # eager, compiled_cuda_graph, cuda_graph or static_cache (falcon_exp/decode.py)
    fast_fallback: str | None  # why the fast path runs without compilation or without CUDA graphs
    bandwidth: dict[str, float]  # bytes/s: "read" (the floor's) and "copy"
    weight_bytes_per_step: int
    kv_bytes_per_token: float
    warmup_tokens: int  # generated untimed before the first timed generation
    cpu_kernel: str | None  # bitsandbytes' CPU kernel for this mode, on a CPU run


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


def _unmeasured_quality(job: JobConfig) -> dict[str, str]:
    if job.quality.enabled and job.prequantized:
        return {"quality/*": "the checkpoint holds quantized weights: there is no unquantized reference to compare with"}
    return {}


def run(job: JobConfig, prepared: Prepared, sweep=None) -> JobResult:
    """Run one job; `sweep` (app.Sweep) says what the other jobs of its sweep will need."""
    device = resolve_device(job.device)
    bandwidth = roofline.bandwidth(device)  # before the weights take the memory
    # the reference first: it may load the unquantized model, which must not evict this job's
    reference = None
    if job.quality.enabled and not job.prequantized:
        tokens = max(sweep.longest_new_tokens if sweep else 0, *prepared.new_tokens)
        free = not job.generation.force_length or bool(sweep and sweep.stops_early)
        reference = quality.reference(job, prepared, device, tokens, free)
    loaded, reused = MODELS.get(job)
    model, tokenizer = loaded.model, prepared.tokenizer
    first_device = next(model.parameters()).device
    inputs = [ids.to(first_device) for ids in prepared.input_ids]
    longest = max(ids.shape[1] + n for ids, n in zip(inputs, prepared.new_tokens))
    decoder = decoder_for(model, job.generation.fast, longest, job.quantization, device, prepared.pad_token_id)
    if decoder.fallback:
        log.warning(f"fast path as {decoder.path}: {decoder.fallback}")
    weights_step = roofline.weight_bytes_per_step(model)

    def generate(index: int) -> tuple[Timing, list[int]]:
        return timed_generate(decoder, inputs[index], prepared.new_tokens[index], job.generation.force_length, device)

    torch.manual_seed(job.seed)
    count = len(inputs)
    # Warm-up: every prompt at its full length, untimed, so that no timed generation is the
    # first of its prompt's shapes (kernel choice, caches) or grows the allocator further.
    warmup_tokens = sum(len(generate(index)[1]) for _ in range(job.generation.warmup) for index in range(count))
    probe = MemoryProbe(sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"}))
    samples = []
    generated_by_prompt: dict[int, list[int]] = {}  # each prompt's first timed continuation
    for repetition in range(job.generation.repetitions):  # repetitions outermost: drift spreads over prompts
        for index in range(count):
            probe.reset()
            timing, generated = generate(index)
            memory = probe.read()
            generated_by_prompt.setdefault(index, generated)
            output = tokenizer.decode(generated, skip_special_tokens=True)
            step = weights_step + decoder.kv_bytes_per_step(timing.prompt_tokens, timing.new_tokens)
            floor = roofline.floor_ms(step, bandwidth["read"])
            fraction = roofline.fraction(floor, timing.decode_ms_per_token)
            samples.append(Sample(index, repetition, job.prompts.items[index], output, timing, memory, floor, fraction))
            log.info(
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
    return JobResult(
        samples=samples,
        memory=peaks,
        unmeasured=dict(probe.unmeasured) | _unmeasured_quality(job),
        report=loaded.report,
        load_s=None if reused else loaded.load_s,
        device=device,
        quality=scores,
        decode_path=decoder.path,
        fast_fallback=decoder.fallback,
        bandwidth=bandwidth,
        weight_bytes_per_step=weights_step,
        kv_bytes_per_token=decoder.kv_bytes_per_token,
        warmup_tokens=warmup_tokens,
        cpu_kernel=cpu_kernel(job.quantization) if device == "cpu" else None,
    )

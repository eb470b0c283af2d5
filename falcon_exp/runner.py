"""One job's measurement: prompts x repetitions on one (cached) model -> plain records.

In order: the device's bandwidth (before the weights take its memory), the quality reference
(before this job's model loads, since computing it may load the unquantized model in its place),
the model, the decoder, a warm-up, the timed generations (those a busy machine disturbed run again),
the quality of what came out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from falcon_exp import corpus, noise, quality, roofline, tasks
from falcon_exp.config import JobConfig
from falcon_exp.console import log
from falcon_exp.decode import Decoder, decoder_for, each_alone
from falcon_exp.job import Job
from falcon_exp.measure import EnergyMeter, MemoryProbe, timed_generate
from falcon_exp.models import MODELS
from falcon_exp.records import JobResult, Sample, SweepNeeds, Timing


def run(job: Job, sweep: SweepNeeds | None = None) -> JobResult:
    """Measure one job; `sweep` says what the other jobs of its sweep need of the quality reference."""
    sweep = sweep or SweepNeeds()
    bandwidth = roofline.bandwidth(job.device)
    reference, unmeasured = _reference(job, sweep)
    corpus_reference = corpus.reference(job) if reference is not None and job.config.quality.corpus else None
    loaded, reused = MODELS.get(job)
    model = loaded.model
    where = next(model.parameters()).device
    inputs = [tuple(t.to(where) for t in job.prompts.batch(i)) for i in range(len(job.prompts.batches))]
    new_tokens = [max(job.prompts.new_tokens[i] for i in batch) for batch in job.prompts.batches]  # equal within a batch
    longest = max(ids.shape[1] + n for (ids, _), n in zip(inputs, new_tokens))
    decoder = decoder_for(model, job.config, longest, job.device, job.prompts.pad_token_id)
    if decoder.fallback:
        log.warning(f"fast path as {decoder.path}: {decoder.fallback}")
    torch.manual_seed(job.config.seed)
    bench = _Bench(job, decoder, inputs, new_tokens, roofline.weight_bytes_per_step(model), bandwidth.read)
    warmup_tokens = bench.warm_up()
    gpus = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    probe, bench.meter = MemoryProbe(gpus), EnergyMeter(job.device, gpus)
    samples, first_outputs = bench.timed(probe)
    method = job.config.quantization.method if job.config.bits != 16 else None
    # the backend's own figures of the last timed step, before re-runs and quality's forward passes overwrite them
    backend_metrics = method.run_metrics(model, job.config) if method else {}
    rerun = lambda off: bench.sample(off.prompt_index, off.repetition, probe)[0]
    samples, found = noise.settle(samples, bench.warm_ms, job.config.noise, job.device, rerun)
    if reference is not None and job.config.batch_size > 1:  # quality is scored on batch-1 outputs, as the reference's are
        first_outputs = each_alone(model, job.prompts.input_ids, list(job.prompts.new_tokens), job.config.force_length,
                                   job.prompts.pad_token_id)
    scores = quality.measure(model, job, reference, first_outputs) if reference is not None else {}
    if job.config.quality.corpus:
        scores |= corpus.measure(model, job, corpus_reference)
    task_results = None
    if job.config.quality.tasks:
        task_scores, task_results = tasks.evaluate(model, job)
        scores |= task_scores
    return JobResult(
        samples=samples,
        memory={key: max(s.memory[key] for s in samples) for key in samples[0].memory},
        unmeasured=probe.unmeasured | bench.meter.unmeasured | unmeasured,
        report=loaded.report,
        load_s=None if reused else loaded.load_s,
        device=job.device,
        quality=scores,
        decode_path=decoder.path,
        prepare_s=decoder.prepare_s,
        fast_fallback=decoder.fallback,
        inductor_options=decoder.inductor_options,
        bandwidth=bandwidth,
        weight_bytes_per_step=bench.weights_step,
        kv_bytes_per_token=decoder.kv_bytes_per_token,
        warmup_tokens=warmup_tokens,
        backend_metrics=backend_metrics,
        backend_tags=method.run_tags(model, job.config, job.device) if method else {},
        noise=found,
        task_results=task_results,
    )


def _reference(job: Job, sweep: SweepNeeds) -> tuple[quality.Reference | None, dict[str, str]]:
    """The quality reference, long enough for every job of the sweep; or why there is none."""
    if not job.config.quality.enabled:
        return None, {}
    if job.weights.prequantized:
        return None, {"quality/*": "the checkpoint holds quantized weights: there is no unquantized reference to compare with"}
    tokens = max(sweep.longest_new_tokens, *job.prompts.new_tokens)
    return quality.reference(job, tokens, free=sweep.stops_early or not job.config.force_length), {}


@dataclass
class _Bench:
    """The generations of one job on its decoder: untimed warm-up, then timed samples."""

    job: Job
    decoder: Decoder
    inputs: list[tuple[torch.Tensor, torch.Tensor]]  # each batch's token ids (left-padded) and attention mask
    new_tokens: list[int]  # each batch's tokens to generate
    weights_step: int  # weight bytes a decode step reads
    read_bandwidth: float
    warm_ms: dict[int, list[float]] = field(default_factory=dict)  # each prompt's warm-up decode times, ms/token
    meter: EnergyMeter | None = None  # the timed generations' energy (warm-ups are not metered)

    @property
    def config(self) -> JobConfig:
        return self.job.config

    def generate(self, index: int) -> tuple[Timing, list[list[int]]]:
        ids, mask = self.inputs[index]
        return timed_generate(self.decoder, ids, self.new_tokens[index], self.config.force_length, self.job.device, self.meter, mask)

    def warm_up(self) -> int:
        """Every prompt at its full length, untimed, so that no timed generation is the first of
        its prompt's shapes (kernel choice, caches) or grows the allocator further. Returns the
        tokens generated; keeps each pass's decode time for the noise check (`warm_ms`)."""
        tokens = 0
        for _ in range(self.config.warmup):
            for index in range(len(self.inputs)):
                timing, generated = self.generate(index)
                self.warm_ms.setdefault(index, []).append(timing.decode_ms_per_token)
                tokens += sum(map(len, generated))
        return tokens

    def timed(self, probe: MemoryProbe) -> tuple[list[Sample], list[list[int]]]:
        """Repetitions outermost, so that drift spreads over prompts; returns the samples (by batch,
        which is a prompt at batch_size=1, then repetition) and each batch's first sequence's first
        timed continuation (the prompts' own at batch_size=1)."""
        samples: list[Sample] = []
        first: dict[int, list[int]] = {}
        for repetition in range(self.config.repetitions):
            for index in range(len(self.inputs)):
                sample, generated = self.sample(index, repetition, probe)
                first.setdefault(index, generated)
                samples.append(sample)
        samples.sort(key=lambda s: (s.prompt_index, s.repetition))
        return samples, [first[i] for i in range(len(self.inputs))]

    def sample(self, index: int, repetition: int, probe: MemoryProbe) -> tuple[Sample, list[int]]:
        """One timed generation of a batch (a prompt at batch_size=1), with its memory peaks and
        its floor: the weights read once per step, every sequence's KV cache."""
        probe.reset()
        timing, generated = self.generate(index)
        memory = probe.read()
        step = self.weights_step + self.decoder.kv_bytes_per_step(timing.prompt_tokens, timing.new_tokens)
        floor = roofline.floor_ms(step, self.read_bandwidth)
        prompts = [self.config.prompts.items[i] for i in self.job.prompts.batches[index]]
        outputs = [self.job.prompts.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in generated]
        sample = Sample(index, repetition, prompts[0], outputs[0], timing, memory, floor, roofline.fraction(floor, timing.decode_ms_per_token),
                        tuple(zip(prompts, outputs)) if len(prompts) > 1 else ())
        what = f"prompt {index + 1}/{len(self.inputs)}" if len(prompts) == 1 else f"batch {index + 1}/{len(self.inputs)} of {len(prompts)}"
        log.info(f"{what} rep {repetition + 1}/{self.config.repetitions}: {timing.new_tokens} tokens in "
                 f"{timing.generate_s:.2f} s ({timing.decode_ms_per_token:.1f} ms/token, {sample.roofline_fraction:.2f} of the bandwidth "
                 "floor)")
        return sample, generated[0]

"""What the harness's timers cost and how far decoding is from the bandwidth floor.

Prints three tables for one model: (1) the harness's timed generate against a bare `generate`
timed the same way (device synchronised, CUDA events on a GPU, perf_counter on the CPU),
interleaved rounds; (2) the harness's figures against torch's profiler on the same generate;
(3) eager against the fast path (static cache and CUDA graphs): ms/token, the fraction of the
bandwidth floor, and whether the tokens are the same; (4) the step's matmuls alone: every linear
layer once at batch 1 (Falcon-7B's joined matrices as the lean step reads them), their kernels
replayed as one CUDA graph, against the bytes they read. A fast step is its matmuls plus the rest
(attention, norms, embeddings, argmax), which is the same for every quantization mode (nearly:
joined layers save a residual add); so bf16's fast step minus its matmuls says what a perfect
quantized kernel would still pay per token, and which fraction of the floor is then within reach; (5) the
fast step's GPU kernels by op class (torch's profiler over the graph's replays): kernels and
microseconds per step in each class, and the time no kernel ran (the gaps between them).

    python experiments/benchmarks/decode.py [--model smollm2-135m-instruct] [--bits 16 4]
        [--weights packaged|synthetic] [--tokens 64] [--rounds 10] [--set dtype=float32 ...]
        [--show overhead profiler floor matmuls kernels] [--decoders eager fast]
        [--attention lean|transformers] [--inductor coordinate_descent_tuning=True ...]

`--attention transformers` runs transformers' own Falcon layers in the fast step (what it ran
before falcon_exp/falcon_step.py); `--inductor` sets inductor's options for the compiled step (a
backend's own, `Backend.inductor_options`, are applied over them: torchao's 8-bit weight-only
compiles with coordinate descent whatever is set here).
"""

from __future__ import annotations

import argparse
import ast
import collections
import re
import statistics
import time

import torch
from hydra import compose, initialize_config_dir

from falcon_exp import decode, falcon_step, quantization, roofline
from falcon_exp.config import CONF_DIR
from falcon_exp.decode import EagerDecoder, FastDecoder, cuda_graph_of
from falcon_exp.job import resolve
from falcon_exp.measure import Clock, median_seconds, synchronize, timed_generate
from falcon_exp.models import MODELS

SECTIONS = ["overhead", "profiler", "floor", "matmuls", "kernels"]
# A kernel's op class by its name, the first pattern that matches: cuBLAS, CUTLASS and the
# quantized libraries' GEMV/GEMM kernels; attention; then inductor's fused kernels, whose names
# list the ops they fuse (triton_poi_fused_add_mul_..., triton_red_fused_native_layer_norm_...).
KERNEL_CLASSES = (
    ("matmul", r"gemm|gemv|nvjet|cutlass|xmma|cublas|tinygemm|marlin|_mm_|matmul|kgemm|kdequant|int4|int8|fp8|splitk"),
    ("attention", r"fmha|flash|attention|sdpa|softmax|_bmm"),
    ("norm", r"layer_norm|rms"),
    ("rotary", r"cos|sin|neg"),
    ("cache write", r"index_copy|index_put|scatter"),
    ("activation", r"gelu"),
    ("argmax, logits", r"argmax|max_|arg_"),
    ("copy, fill", r"copy|memcpy|fill|cat|clone"),
    ("elementwise", r"elementwise|triton_poi"),
)


def bare_generate(model, input_ids, tokens: int, device: str, pad: int) -> float:
    """Seconds for a plain generate call, timed as the harness times (its own clock, no streamer)."""
    clock = Clock(device)
    synchronize(device)
    clock.mark()
    with torch.inference_mode():
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                       min_new_tokens=tokens, do_sample=False, pad_token_id=pad)
    clock.mark()
    return clock.seconds()[-1]


def overhead(model, ids, tokens, device, pad, rounds) -> None:
    eager = EagerDecoder(model, pad)
    harness = lambda: timed_generate(eager, ids, tokens, True, device)[0].generate_s  # noqa: E731
    bare = lambda: bare_generate(model, ids, tokens, device, pad)  # noqa: E731
    harness(), bare()  # warm-up, untimed
    timed = {"harness": [], "bare": []}
    for round_ in range(rounds):  # interleaved, in alternating order, so drift and order hit both alike
        for name in ("harness", "bare") if round_ % 2 == 0 else ("bare", "harness"):
            timed[name].append((harness if name == "harness" else bare)())
    h, b = statistics.median(timed["harness"]), statistics.median(timed["bare"])
    paired = statistics.median(x / y - 1 for x, y in zip(timed["harness"], timed["bare"]))
    print(f"  bare generate    median {b * 1e3:9.2f} ms  (min {min(timed['bare']) * 1e3:.2f})")
    print(f"  harness generate median {h * 1e3:9.2f} ms  (min {min(timed['harness']) * 1e3:.2f})")
    print(f"  overhead {100 * (h - b) / b:+.2f}% of the bare call (medians of {rounds} interleaved rounds); "
          f"median of the rounds' own ratios {100 * paired:+.2f}%")
    per_token = _callback_seconds(device, ids.device)
    print(f"  the harness's own work per token (streamer and clock mark): {per_token * 1e6:.1f} us, "
          f"{100 * per_token * tokens / b:.3f}% of the bare call")


def _callback_seconds(device: str, where) -> float:
    """What the harness adds inside generate, timed alone: the streamer's put and a clock mark."""
    from falcon_exp.decode import _Streamer

    clock = Clock(device)
    streamer = _Streamer(clock.mark)
    token = torch.zeros(1, dtype=torch.long, device=where).cpu()
    count = 10_000
    begin = time.perf_counter()
    for _ in range(count):
        streamer.put(token)
    return (time.perf_counter() - begin) / count


def against_profiler(decoder, ids, tokens, device) -> None:
    """The harness's generate_s and ms/token beside the profiler's view of the same call: on a
    GPU the span from the first kernel's start to the last kernel's end, on the CPU the span of
    the model's forward calls."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        timing, _ = timed_generate(decoder, ids, tokens, True, device)
    events = prof.events()
    if device == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        begin = min(e.time_range.start for e in kernels)
        end = max(e.time_range.end for e in kernels)
        what = f"{len(kernels)} GPU kernels, first start to last end"
    else:
        spans = [e for e in events if e.name.endswith("forward") or e.name == "aten::linear"]
        begin, end = min(e.time_range.start for e in spans), max(e.time_range.end for e in spans)
        what = "CPU ops, first linear to last"
    profiled_ms = (end - begin) / 1e3
    print(f"  {decoder.path}: harness generate_s {timing.generate_s * 1e3:.2f} ms, profiler {profiled_ms:.2f} ms "
          f"({what}): harness/profiler {timing.generate_s * 1e3 / profiled_ms:.4f}")


def kernel_class(name: str) -> str:
    return next((what for what, pattern in KERNEL_CLASSES if re.search(pattern, name, re.IGNORECASE)), "other")


def kernels_by_class(decoder, ids, tokens: int, ms_per_token: float | None) -> None:
    """The fast step's kernels, profiled over its graph's replays after a prefill, by op class;
    the step's time no kernel covered is the gaps between kernels (launch latency inside the graph)."""
    from torch.profiler import ProfilerActivity, profile

    if decoder.graph is None:
        print(f"  no graph to profile ({decoder.path})")
        return
    steps = tokens - 1
    with torch.no_grad():
        decoder.cache.reset()
        decoder._prefill(ids, None)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                decoder.graph.replay()
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    span_us = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / steps
    classes: dict[str, list[float]] = collections.defaultdict(list)
    names: collections.Counter = collections.Counter()
    launches: collections.Counter = collections.Counter()
    for e in kernels:
        classes[kernel_class(e.name)].append(e.time_range.elapsed_us())
        names[e.name] += e.time_range.elapsed_us()
        launches[e.name] += 1
    busy = sum(sum(times) for times in classes.values()) / steps
    print(f"  {len(kernels) / steps:.0f} kernels per step, {span_us:.1f} us per step first start to last end"
          + (f" (timed: {ms_per_token * 1e3:.1f} us)" if ms_per_token else "") + f", {busy:.1f} us in kernels")
    print(f"  {'op class':<16}{'kernels/step':>13}{'us/step':>10}{'share':>8}")
    for what, times in sorted(classes.items(), key=lambda item: -sum(item[1])):
        print(f"  {what:<16}{len(times) / steps:>13.1f}{sum(times) / steps:>10.1f}{sum(times) / steps / span_us:>8.1%}")
    print(f"  {'gaps':<16}{'':>13}{span_us - busy:>10.1f}{(span_us - busy) / span_us:>8.1%}")
    for name, us in names.most_common(12):
        print(f"    {us / steps:8.1f} us/step  {launches[name] / steps:5.0f}x  {kernel_class(name):<14} {name[:100]}")


def matmuls_alone(model, device: str, config) -> tuple[float, int]:
    """The ms one decode step spends reading its weights alone: every linear layer once at batch 1
    (where falcon_exp/falcon_step.py joined a Falcon layer's four matrices, its two joined ones,
    as the step reads them), their kernels captured as one CUDA graph so no launch or Python cost
    is counted (on the CPU, or where a layer cannot be captured, called plainly); and the bytes
    those reads hold."""
    where = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    matrices, joined = [], set()  # (a joined matrix, its input); the modules joined
    for layer in model.modules():
        for matrix in layer.__dict__.get(falcon_step.SHARED, ()):
            matrices.append((matrix, torch.randn(1, 1, matrix.shape[1], dtype=dtype, device=where)))
        if falcon_step.SHARED in layer.__dict__:
            joined.update(map(id, layer.modules()))
    linears = [(m, torch.randn(1, 1, input_width(m), dtype=dtype, device=where))
               for _, m in config.quantization.method.layers(model) if id(m) not in joined]

    def step() -> None:
        for module, x in linears:
            module(x)
        for matrix, x in matrices:
            x @ matrix.T

    work, how = step, "plain calls"
    if device == "cuda":
        try:
            work, how = cuda_graph_of(step).replay, "one CUDA graph"
        except Exception as error:  # noqa: BLE001 - a layer that syncs with the host cannot be captured
            torch.cuda.synchronize()
            how = f"plain calls (no graph: {str(error).strip().splitlines()[0][:120]})"
    with torch.no_grad():
        ms = median_seconds(device, where.index or 0, work, roofline.ROUNDS[device]) * 1e3
    # after the calls: a layer may move its scales into its state on its first forward (LLM.int8)
    held = sum(quantization.weights_bytes(m) for m, _ in linears) + sum(w.numel() * w.element_size() for w, _ in matrices)
    print(f"  {len(linears)} linear layers and {len(matrices)} joined matrices, {held / 1e9:.3f} GB: {ms:.3f} ms per step ({how}), "
          f"{held / ms / 1e6:.0f} GB/s")
    return ms, held


def input_width(layer) -> int:
    """A linear layer's input width: nn.Linear's, hqq's tinygemm layer's before its padding, or
    the shape in an HQQLinear's metadata."""
    for name in ("origin_in_features", "in_features"):
        if hasattr(layer, name):
            return getattr(layer, name)
    return layer.meta["shape"][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--weights", default=None, help="synthetic for Falcon without the hub")
    parser.add_argument("--bits", type=int, nargs="+", default=[16])
    parser.add_argument("--runs", nargs="+", default=None,
                        help='one model per item, each its own overrides, e.g. "bits=16" "bits=4 quantization.backend=torchao" '
                             "(instead of --bits)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--set", nargs="*", default=[], help="more overrides for every run, e.g. dtype=float32")
    parser.add_argument("--show", nargs="+", default=["overhead", "profiler", "floor"], choices=SECTIONS)
    parser.add_argument("--decoders", nargs="+", default=["eager", "fast"], choices=["eager", "fast"])
    parser.add_argument("--attention", default="lean", choices=["lean", "transformers"])
    parser.add_argument("--inductor", nargs="*", default=[], help="inductor options, e.g. coordinate_descent_tuning=True")
    args = parser.parse_args()
    if args.attention == "transformers":
        decode.share_reads = lambda model: 0
        falcon_step._one_token_attention = falcon_step._TRANSFORMERS_ATTENTION
        falcon_step._one_token_layer = falcon_step._TRANSFORMERS_LAYER
    for option in args.inductor:
        key, value = option.split("=", 1)
        setattr(torch._inductor.config, key, ast.literal_eval(value))
    rest_ms = None  # a fast step's time outside its matmuls: the first run that measures both sets it
    for run in args.runs or [f"bits={bits}" for bits in args.bits]:
        overrides = [f"model={args.model}", "max_length=null", f"max_new_tokens={args.tokens}", "quality.enabled=false",
                     *run.split(), *args.set] + ([f"model.weights={args.weights}"] if args.weights else [])
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            job = resolve(compose("config", overrides=overrides))
        loaded, _ = MODELS.get(job)
        model, device, pad = loaded.model, job.device, job.prompts.pad_token_id
        ids = job.prompts.input_ids[0].to(next(model.parameters()).device)
        name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
        print(f"\n== {args.model} {job.config.mode} ({run}) on {name}, prompt {ids.shape[1]} tokens, {args.tokens} new tokens ==")
        if "overhead" in args.show:
            print("(1) the harness's overhead")
            overhead(model, ids, args.tokens, device, pad, args.rounds)
        bandwidth = roofline.bandwidth(device).read
        weights = roofline.weight_bytes_per_step(model)
        decoders = {}
        if {"profiler", "floor", "kernels"} & set(args.show):  # the sections that decode: building the fast one compiles and captures the step
            if "eager" in args.decoders:
                decoders[False] = EagerDecoder(model, pad)
            if "fast" in args.decoders:
                decoders[True] = FastDecoder(model, ids.shape[1] + args.tokens, job.config, device)
                print(f"  fast path: {decoders[True].path}, prepared in {decoders[True].prepare_s:.1f} s")
        if "profiler" in args.show:
            print("(2) against torch's profiler")
            for decoder in decoders.values():
                against_profiler(decoder, ids, args.tokens, device)
        results = {}
        if "floor" in args.show:
            print(f"(3) {' and '.join(args.decoders)} against the floor (weights {weights / 1e9:.3f} GB per step, "
                  f"read bandwidth {bandwidth / 1e9:.0f} GB/s)")
            for fast, decoder in decoders.items():
                timed_generate(decoder, ids, args.tokens, True, device)  # warm-up
                runs = [timed_generate(decoder, ids, args.tokens, True, device) for _ in range(args.rounds)]
                ms = statistics.median(t.decode_ms_per_token for t, _ in runs)
                floor = roofline.floor_ms(weights + decoder.kv_bytes_per_step(ids.shape[1], args.tokens), bandwidth)
                results[fast] = (ms, runs[0][1], floor)
                print(f"  {decoder.path:<19} {ms:8.2f} ms/token  floor {floor:.3f} ms  roofline_fraction {roofline.fraction(floor, ms):.3f}"
                      + (f"  (fallback: {decoder.fallback})" if decoder.fallback else ""))
            if len(results) == 2:
                eager_tokens, fast_tokens = results[False][1], results[True][1]
                same = sum(a == b for a, b in zip(eager_tokens, fast_tokens))
                first = next((i for i, (a, b) in enumerate(zip(eager_tokens, fast_tokens)) if a != b), None)
                print(f"  speed-up {results[False][0] / results[True][0]:.2f}x; tokens equal: {same}/{len(eager_tokens)}"
                      + (f" (first difference at token {first})" if first is not None else ""))
        if "matmuls" in args.show:
            print("(4) the step's matmuls alone")
            matmul_ms, held = matmuls_alone(model, device, job.config)
            fast_ms = results[True][0] if True in results and decoders[True].graph is not None else None
            if fast_ms is not None and rest_ms is None:
                rest_ms = fast_ms - matmul_ms
                print(f"  the fast step's rest (attention, norms, embeddings, argmax): {fast_ms:.3f} - {matmul_ms:.3f} "
                      f"= {rest_ms:.3f} ms per token")
            if rest_ms is not None:  # then every run timed the fast path against its floor (the options are the same for all)
                floor = results[True][2]
                perfect = held / bandwidth * 1e3 + rest_ms
                print(f"  matmuls + rest = {matmul_ms + rest_ms:.3f} ms per token" + (f" (fast path measured {fast_ms:.3f})" if fast_ms else "")
                      + f"; with its matmuls at the read bandwidth {perfect:.3f} ms: at most {floor / perfect:.3f} of the floor "
                      f"({floor:.3f} ms)")
        if "kernels" in args.show and True in decoders:
            print("(5) the fast step's kernels by op class")
            kernels_by_class(decoders[True], ids, args.tokens, results[True][0] if True in results else None)
        del decoders
        MODELS.clear()


if __name__ == "__main__":
    main()

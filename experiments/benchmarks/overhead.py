"""The harness's own cost: its timed generate (streamer stamping every token, device syncs)
against a bare `generate` timed the same way, interleaved, on the same model and prompt.

    python experiments/benchmarks/overhead.py [--model smollm2-135m-instruct] [--bits 16]
        [--tokens 32] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir

from falcon_exp.config import CONF_DIR, JobConfig
from falcon_exp.measure import synchronize, timed_generate
from falcon_exp.models import MODELS
from falcon_exp.runner import prepare


def bare_generate(model, input_ids, tokens: int, device: str, pad: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                       min_new_tokens=tokens, do_sample=False, pad_token_id=pad)
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", f"bits={args.bits}", "max_length=null",
                                           f"max_new_tokens={args.tokens}", "quality.enabled=false"])
    job = JobConfig.from_hydra(cfg)
    prepared = prepare(job)
    loaded = MODELS.get(job)
    model, device = loaded.model, loaded.device
    ids = prepared.input_ids[0].to(next(model.parameters()).device)
    pad = prepared.pad_token_id
    harness = lambda: timed_generate(model, ids, args.tokens, True, device, pad)[0].generate_s  # noqa: E731
    bare = lambda: bare_generate(model, ids, args.tokens, device, pad)  # noqa: E731
    harness(), bare()  # warm-up, untimed
    timed = {"harness": [], "bare": []}
    for _ in range(args.rounds):  # interleaved, so drift hits both alike
        timed["harness"].append(harness())
        timed["bare"].append(bare())
    h, b = statistics.median(timed["harness"]), statistics.median(timed["bare"])
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"{args.model} bits={args.bits} on {name}, {args.tokens} tokens, {args.rounds} interleaved rounds")
    print(f"bare generate    median {b * 1e3:9.2f} ms  (min {min(timed['bare']) * 1e3:.2f})")
    print(f"harness generate median {h * 1e3:9.2f} ms  (min {min(timed['harness']) * 1e3:.2f})")
    print(f"overhead {100 * (h - b) / b:+.2f}% of the bare call (medians)")


if __name__ == "__main__":
    main()

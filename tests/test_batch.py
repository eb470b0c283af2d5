"""Batches: B prompts decoded together, left-padded, on both decode paths; what a batch logs."""

from __future__ import annotations

import pytest

from conftest import compose, resolve_job
from falcon_exp.errors import ConfigError


@pytest.mark.parametrize("overrides, message", [
    (["batch_size=4"], "batch_size=4 decodes sequences together, each generating the same tokens: give max_new_tokens=N"),
    (["batch_size=4", "max_length=null", "max_new_tokens=8", "force_length=false"], "and force_length=true"),
    (["batch_size=0"], "batch_size=0 is not allowed; it must be an integer >= 1"),
])
def test_a_batch_needs_a_fixed_count_of_new_tokens(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose("model=tiny-falcon", *overrides)


def test_prompts_are_cycled_to_fill_each_batch_and_left_padded():
    job = resolve_job("model=tiny-falcon", "batch_size=4", "max_length=null", "max_new_tokens=8")
    prompts = job.prompts
    assert prompts.batches == ((0, 1, 2, 3), (4, 0, 1, 2)) and prompts.distinct == 4
    ids, mask = prompts.batch(1)
    lengths = [prompts.input_ids[i].shape[1] for i in (4, 0, 1, 2)]
    assert ids.shape == (4, max(lengths)) and mask.sum(1).tolist() == lengths
    for row, (i, length) in enumerate(zip((4, 0, 1, 2), lengths)):
        assert ids[row, -length:].tolist() == prompts.input_ids[i][0].tolist() and not mask[row, :-length].any()
    assert resolve_job("model=tiny-falcon", "batch_size=16", "max_length=null", "max_new_tokens=8").prompts.distinct == 5


def test_a_batch_decodes_each_prompt_as_it_decodes_alone_on_both_paths():
    """float32: the padded batch, eager and on the fast path's static cache (its mask, positions
    and slot buffers), gives every prompt the greedy tokens it gets alone."""
    from falcon_exp.decode import EagerDecoder, FastDecoder
    from falcon_exp.models import load

    job = resolve_job("model=tiny-falcon", "batch_size=3", "max_length=null", "max_new_tokens=10", "dtype=float32", "bits=16")
    model = load(job).model
    ids, mask = job.prompts.batch(0)
    assert len(set(mask.sum(1).tolist())) > 1  # prompts of different lengths: padding is exercised
    alone = [EagerDecoder(model, job.prompts.pad_token_id).generate(job.prompts.input_ids[i], 10, True, lambda: None)[0]
             for i in job.prompts.batches[0]]
    eager = EagerDecoder(model, job.prompts.pad_token_id, 3).generate(ids, 10, True, lambda: None, mask)
    fast = FastDecoder(model, ids.shape[1] + 10, job.config, "cpu", 3)
    assert eager == alone and fast.generate(ids, 10, True, lambda: None, mask) == alone
    assert fast.kv_bytes_per_token == EagerDecoder(model, 0).kv_bytes_per_token  # per token of one sequence, on both paths


def test_the_floor_at_a_batch_reads_the_weights_once_and_every_sequences_cache(tmp_path):
    """One prompt cycled into a batch of two against it alone: the step reads the same weights and
    twice the KV cache, so the floor grows by one sequence's KV alone, and the aggregate rate is
    the batch times the per-sequence rate."""
    from falcon_exp import runner, schema

    (tmp_path / "one.yaml").write_text("- Name three colours.\n")
    common = ("model=tiny-falcon", f"prompts.file={tmp_path / 'one.yaml'}", "max_length=null", "max_new_tokens=8", "repetitions=1",
              "warmup=0", "quality.enabled=false", "noise.reruns=0")
    one, two = (runner.run(resolve_job(*common, f"batch_size={size}")) for size in (1, 2))
    weights_ms = one.weight_bytes_per_step / one.bandwidth.read * 1e3
    assert weights_ms > 0 and two.weight_bytes_per_step == one.weight_bytes_per_step
    floor1, floor2 = one.samples[0].floor_ms_per_token, two.samples[0].floor_ms_per_token
    assert floor2 == pytest.approx(2 * floor1 - weights_ms, rel=1e-9) and floor2 < 2 * floor1
    figures = two.figures()
    assert figures[schema.AGGREGATE_TOKENS_PER_S] == pytest.approx(2 * figures[schema.DECODE_TOKENS_PER_S], rel=1e-12)
    assert figures[schema.total(schema.NEW_TOKENS)] == 2 * 8 and two.samples[0].timing.batch == 2
    (first, second), = [s.sequences for s in two.samples]
    assert first == second == ("Name three colours.", one.samples[0].output)  # the same prompt, the same greedy text

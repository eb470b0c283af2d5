"""Timers and memory probes on a real (tiny) model."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from falcon_exp import measure
from falcon_exp.decode import EagerDecoder
from falcon_exp.measure import MemoryProbe, timed_generate
from falcon_exp.quantization import quantizable_linears
from falcon_exp.records import median, repetition_std


@pytest.fixture(scope="module")
def tiny_model():
    from transformers.models.falcon.modeling_falcon import FalconForCausalLM

    from falcon_exp.weights import architecture_config, synthetic_state_dict

    config = architecture_config("tiny-falcon")
    state = synthetic_state_dict(config, seed=0, dtype=torch.bfloat16, distinct=True)
    with quantizable_linears():
        return FalconForCausalLM.from_pretrained(None, config=config, state_dict=state, dtype=torch.bfloat16).eval()


def test_forced_length_generates_exactly_the_asked_tokens_and_times_them(tiny_model):
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    timing, (generated,) = timed_generate(EagerDecoder(tiny_model, 2), prompt, new_tokens=12, force_length=True, device="cpu")
    assert timing.prompt_tokens == 5 and timing.new_tokens == 12 == len(generated)
    assert 0 < timing.ttft_ms < timing.generate_s * 1e3
    # first token, then 11 decode steps: their sum cannot exceed the whole call
    assert timing.ttft_ms + 11 * timing.decode_ms_per_token <= timing.generate_s * 1e3 + 1e-6
    assert timing.e2e_tokens_per_s == pytest.approx(12 / timing.generate_s)


def test_greedy_generation_is_deterministic(tiny_model):
    prompt = torch.tensor([[11, 12, 13]])
    runs = [timed_generate(EagerDecoder(tiny_model, 2), prompt, 8, True, "cpu")[1] for _ in range(2)]
    assert runs[0] == runs[1]


def test_one_new_token_has_no_decode_time(tiny_model):
    timing, _ = timed_generate(EagerDecoder(tiny_model, 2), torch.tensor([[3, 4]]), 1, True, "cpu")
    assert timing.new_tokens == 1 and math.isnan(timing.decode_ms_per_token)


def test_the_spread_is_between_repetitions_not_between_prompts():
    """Two prompts of very different lengths, each timed twice: the pooled spread would be the
    prompts' difference (~90); the spread between repetitions is each prompt's own noise."""
    by_prompt = {0: [10.0, 12.0], 1: [100.0, 101.0], 2: [50.0, float("nan")]}
    stdevs = [math.sqrt(2), math.sqrt(0.5)]  # sample std of (10, 12) and of (100, 101); prompt 2 has one value
    assert repetition_std(by_prompt) == pytest.approx(sum(stdevs) / 2)
    assert repetition_std({0: [3.0], 1: [4.0]}) is None  # one repetition: no spread to report
    assert median([4.0, 1.0, float("nan"), 2.0]) == 2.0 and median([float("nan")]) is None


def test_host_peak_memory_sees_an_allocation_after_reset():
    """In a fresh process: a long-lived one may reuse freed pages it still holds."""
    code = (
        "import torch\n"
        "from falcon_exp.measure import MemoryProbe\n"
        "probe = MemoryProbe([])\n"
        "probe.reset()\n"
        "before = probe.read()['memory/peak_rss_gb']\n"
        "block = torch.ones(200 * 1024 * 1024, dtype=torch.uint8)\n"
        "del block\n"
        "after = probe.read()['memory/peak_rss_gb']\n"
        "probe.reset()\n"
        "print(before, after, probe.read()['memory/peak_rss_gb'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    before, after, reset = map(float, done.stdout.split())
    assert after - before > 0.2  # the freed 210 MB block still counts in the peak
    assert reset < after - 0.2  # and a reset forgets it


def test_a_host_peak_that_cannot_be_reset_is_not_logged_as_the_generations_peak(tmp_path, monkeypatch):
    """Without a reset the high-water mark holds the whole process's past (the model's load, say):
    the probe says why and gives no figure, rather than a peak that is not this generation's."""
    monkeypatch.setattr(measure, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    probe = MemoryProbe([])
    probe.reset()
    assert "peak_rss_gb" not in str(probe.read())
    assert "could not be reset" in probe.unmeasured["memory/peak_rss_gb"]


def test_tail_percentiles_are_nearest_ranks_and_ttfts_need_enough_generations():
    """p99 of 1..200 ms is 198 (a value that occurred); a TTFT percentile only where 100 / (100 - p)
    generations back it: four give p50 alone, a hundred give p99."""
    from falcon_exp import schema
    from falcon_exp.records import Sample, Timing, tail

    def samples(count: int, latencies: tuple[float, ...]) -> list[Sample]:
        timing = lambda i: Timing(5, len(latencies) + 1, 1.0, float(i + 1), 1.0, 1.0, 0.0, itl_ms=latencies)
        return [Sample(i, 0, "p", "o", timing(i), {}, 1.0, 1.0) for i in range(count)]

    four = tail(samples(4, tuple(float(ms) for ms in range(1, 51))))
    assert four[schema.ITL_COUNT] == 200 and four[schema.itl_percentile(99)] == 50.0 and four[schema.itl_percentile(50)] == 25.0
    assert four[schema.ttft_percentile(50)] == 2.0 and schema.ttft_percentile(90) not in four
    hundred = tail(samples(100, (1.0,)))
    assert hundred[schema.ttft_percentile(99)] == 99.0 and hundred[schema.ttft_percentile(90)] == 90.0


def test_rapl_energy_is_read_across_the_counters_wrap(tmp_path, monkeypatch):
    """The kernel's RAPL files as sysfs lays them out (this machine has none): package domains only,
    and a counter that wrapped past max_energy_range_uj still counts what was drawn."""
    from falcon_exp import measure

    for name, domain in (("intel-rapl:0", "package-0"), ("intel-rapl:0:0", "core"), ("intel-rapl:1", "package-1"),
                         ("intel-rapl-mmio:0", "package-0")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "name").write_text(domain + "\n")
        (folder / "max_energy_range_uj").write_text("1000000\n")
        (folder / "energy_uj").write_text("999000\n")
    monkeypatch.setattr(measure, "_RAPL", tmp_path)
    meter = measure.EnergyMeter("cpu", [])
    assert meter.unmeasured == {}
    before = meter.read()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("2000\n")  # wrapped: 1000 + 2001 uJ
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("999500\n")
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("5\n")  # a sub-domain of package 0: not counted twice
    (tmp_path / "intel-rapl-mmio:0" / "energy_uj").write_text("999999\n")  # package 0 again, through MMIO: nor this
    assert meter.joules_since(before) == (3001 + 500) / 1e6
    monkeypatch.setattr(measure, "_RAPL", tmp_path / "absent")
    assert "no RAPL package energy counter" in measure.EnergyMeter("cpu", []).unmeasured["energy/joules_per_token"]


def test_joules_per_token_count_every_sequence_of_a_batch():
    """10 J over a batch of two sequences of 5 tokens each: 1 J a token, 5 W over 2 s."""
    from falcon_exp import schema
    from falcon_exp.records import Sample, Timing, _columns

    timing = Timing(4, 5, 2.0, 1.0, 1.0, 2.5, 0.0, joules=10.0, batch=2)
    columns = _columns([Sample(0, 0, "p", "o", timing, {}, 1.0, 1.0)])
    assert columns[schema.JOULES_PER_TOKEN] == [1.0] and columns[schema.MEAN_POWER_W] == [5.0]

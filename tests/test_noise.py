"""A busy machine is said, not averaged in: real competing processes beside a real job."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import QUICK, resolve_job
from falcon_exp import runner, schema
from falcon_exp.config import NoiseConfig
from falcon_exp.noise import settle
from falcon_exp.records import Sample, Timing

BUSY = [sys.executable, "-c", "while True: pass"]


def test_a_busy_machine_is_found_said_tagged_and_its_generations_run_again(store, two_prompts, tmp_path, monkeypatch, caplog):
    """Processes that keep every core busy start before the second repetition and stop after it:
    both of its generations are found off, said in one line with the likely cause, run again on
    the quiet machine, and logged apart from the samples, which keep only the re-runs."""
    from mlflow import MlflowClient

    from falcon_exp.analysis import analyse, tables
    from falcon_exp.lifecycle import job_run
    from falcon_exp.tracking import log_result

    job = resolve_job(*QUICK, "noise.reruns=2", f"prompts.file={two_prompts}")
    real, calls, busy = runner.timed_generate, [], []

    def timed_generate(*args):  # calls: 1-2 the warm-up, 3-4 the first repetition, 5-6 the second, 7- the re-runs
        calls.append(len(calls) + 1)
        if calls[-1] == 5:
            busy.extend(subprocess.Popen(BUSY) for _ in range(2))
            time.sleep(0.5)  # running before the generation starts
        elif calls[-1] == 7:
            for process in busy:
                process.kill()
                process.wait()
        return real(*args)

    monkeypatch.setattr(runner, "timed_generate", timed_generate)
    try:
        result = runner.run(job)
    finally:
        for process in busy:
            process.kill()
    # (the machine beside the test is not quiet either, and a tiny model's milliseconds are noisy on their own:
    # a generation of the first repetition may be off too)
    busy_tries = [s for s in result.noise.replaced if s.timing.cpu_wait_share > job.config.noise.max_cpu_wait]
    assert {(0, 1), (1, 1)} <= {(s.prompt_index, s.repetition) for s in busy_tries} and len(result.samples) == 4
    kept = {(s.prompt_index, s.repetition): s.timing.cpu_wait_share for s in result.samples}
    assert all(kept[(s.prompt_index, s.repetition)] < s.timing.cpu_wait_share for s in busy_tries)  # run again once they stopped
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("noise:")]
    assert "prompt 1 rep 2" in said[0] and "prompt 2 rep 2" in said[0], said
    assert "likely cause: another process held this job's CPU cores" in said[0] and "again (1 of 2)" in said[0]

    with job_run(job, "busy", {}, "", parent_run_id=None, output_dir=None) as run_id:
        log_result(run_id, job, result)
    client = MlflowClient(store)
    run = client.get_run(run_id)
    rerun, off, tries = result.noise.rerun, result.noise.still_off, len(result.noise.replaced)
    assert run.data.metrics[schema.NOISE_RERUN] == rerun >= 2 and run.data.metrics[schema.NOISE_OFF] == off
    assert run.data.tags[schema.TAG_NOISE].endswith(f"{rerun} re-run, {off} still off")
    kept = {p.value for p in client.get_metric_history(run_id, schema.sample(schema.DECODE_MS_PER_TOKEN))}
    dropped_points = client.get_metric_history(run_id, schema.dropped(schema.DECODE_MS_PER_TOKEN))
    assert sorted(p.step for p in dropped_points) == list(range(tries)) and len(kept) == 4
    assert {p.value for p in dropped_points} == {s.timing.decode_ms_per_token for s in result.noise.replaced}
    assert not kept & {p.value for p in dropped_points}
    repetitions = [p.value for p in client.get_metric_history(run_id, schema.DROPPED_REPETITION)]
    assert sorted(repetitions) == sorted(s.repetition for s in result.noise.replaced)

    analyse(store, tmp_path, sweep=None)  # what the analysis makes of it
    table = (tmp_path / "comparison.md").read_text()
    assert f"| {rerun} re-run, {off} still off |" in table and tables.NOISE_NOTE in table


def _sample(prompt: int, repetition: int, ms: float, wait: float = 0.0) -> Sample:
    timing = Timing(prompt_tokens=4, new_tokens=8, generate_s=ms * 8e-3, ttft_ms=ms, decode_ms_per_token=ms, e2e_tokens_per_s=1.0,
                    cpu_wait_share=wait)
    return Sample(prompt, repetition, "p", "o", timing, {}, 1.0, 1.0 / ms)


@pytest.mark.parametrize("warm, reruns, rerun_ms, found", [
    ([10.0], 2, [10.5], (1, 0)),  # warm-up, two repetitions: the slow one is run again and is quiet
    ([], 2, [10.5], (0, 1)),  # two observations alone cannot say which one was disturbed: said, not run again
    ([10.0], 0, [10.5], (0, 1)),  # noise.reruns=0: said, not run again
    ([10.0], 2, [40.0, 35.0], (1, 1)),  # still off after both re-runs: one generation, two tries replaced; kept, counted
])
def test_a_slow_repetition_is_run_again_only_where_the_evidence_allows(warm, reruns, rerun_ms, found):
    """The ratio to the prompt's quickest, the evidence it needs, and the bound on re-runs."""
    samples = [_sample(0, 0, 10.2), _sample(0, 1, 41.0)]
    times = iter(rerun_ms)
    reruns_seen = []

    def rerun(off: Sample) -> Sample:
        reruns_seen.append((off.prompt_index, off.repetition))
        return _sample(off.prompt_index, off.repetition, next(times))

    kept, noise = settle(samples, {0: warm} if warm else {}, NoiseConfig(max_ratio=1.5, max_cpu_wait=0.1, reruns=reruns), "cpu", rerun)
    assert (noise.rerun, noise.still_off) == found and set(reruns_seen) <= {(0, 1)} and len(noise.replaced) == len(reruns_seen)
    assert [s.repetition for s in kept] == [0, 1] and noise.said.endswith(f"{found[0]} re-run, {found[1]} still off")
    assert kept[0].timing.decode_ms_per_token == 10.2


def test_a_quiet_run_is_not_touched():
    samples = [_sample(0, 0, 10.0), _sample(0, 1, 12.0), _sample(1, 0, 20.0), _sample(1, 1, 21.0, wait=0.05)]
    kept, noise = settle(samples, {0: [10.5], 1: [20.5]}, NoiseConfig(1.5, 0.1, 2), "cpu", lambda off: pytest.fail("run again"))
    assert kept == samples and noise.replaced == [] and noise.still_off == 0 and noise.said is None

"""A busy machine, said rather than averaged in.

Another process on a shared machine only ever adds time to a generation, so the quickest decode
of a prompt in a run (warm-up passes and re-runs included) is the best estimate of what the quiet
machine does (Chen and Revels, "Robust benchmarking in noisy environments", 2016). A timed
generation is *off* when its decode time per token is over `noise.max_ratio` times its prompt's
quickest, or when this process's threads waited for a CPU over `noise.max_cpu_wait` of its time
(another process held the cores, even one that held them from the start, which no ratio sees).

Off generations are run again, up to `noise.reruns` times, where the evidence allows: its threads
waited over the bound, or the prompt was observed at least three times (of two, a ratio alone cannot say
which one was disturbed). A re-run's sample takes the place of the try it repeats, which is kept
apart (logged as `dropped/<name>`, never among the samples). What was found is said in one line and
tagged on the run; what is still off after the re-runs stays in the medians, counted.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

from falcon_exp.config import NoiseConfig
from falcon_exp.console import log
from falcon_exp.records import Noise, Sample

EVIDENCE = 3  # observations of a prompt (warm-ups and timed) that let a ratio alone call one of them off
SHOWN = 3  # off generations named in a line, the worst first


@dataclass(frozen=True)
class Finding:
    sample: Sample
    ratio: float  # its decode time per token over its prompt's quickest
    waited: bool  # its threads waited for a CPU beyond the bound

    def __str__(self) -> str:
        wait = self.sample.timing.cpu_wait_share
        said = f"prompt {self.sample.prompt_index + 1} rep {self.sample.repetition + 1} at {self.ratio:.2f}x"
        return said + (f", waiting {wait:.0%}" if wait == wait else "")


def settle(samples: list[Sample], warm_ms: dict[int, list[float]], config: NoiseConfig, device: str,
           rerun: Callable[[Sample], Sample]) -> tuple[list[Sample], Noise]:
    """The samples with their off generations run again (`rerun` times one anew), and what was found."""
    observed = {i: list(ms) for i, ms in warm_ms.items()}
    for sample in samples:
        observed.setdefault(sample.prompt_index, []).append(sample.timing.decode_ms_per_token)
    samples, replaced, first_said = list(samples), [], None
    for attempt in range(config.reruns + 1):
        off = _off(samples, observed, config)
        if not off:
            break
        first_said = first_said or _said(off, len(samples), config)
        again = [f for f in off if f.waited or len(observed[f.sample.prompt_index]) >= EVIDENCE] if attempt < config.reruns else []
        action = (f"running {'them' if len(again) > 1 else 'it'} again ({attempt + 1} of {config.reruns})" if len(again) == len(off)
                  else f"running {len(again)} of them again ({attempt + 1} of {config.reruns})" if again
                  else _why_not_again(config, attempt))
        log.warning(f"noise: {_said(off, len(samples), config)}; likely cause: {_cause(off, device)}; {action}")
        for finding in again:
            retried = rerun(finding.sample)
            observed[retried.prompt_index].append(retried.timing.decode_ms_per_token)
            at = next(i for i, s in enumerate(samples) if (s.prompt_index, s.repetition) == (retried.prompt_index, retried.repetition))
            samples[at] = retried
            replaced.append(finding.sample)
        if not again:
            break
    still_off = len(_off(samples, observed, config))
    found = Noise(replaced=replaced, still_off=still_off, said=None)
    return samples, dataclasses.replace(found, said=f"{first_said}; {found.summary()}" if first_said else None)


def _off(samples: list[Sample], observed: dict[int, list[float]], config: NoiseConfig) -> list[Finding]:
    """The off generations, the worst first."""
    found = []
    for sample in samples:
        quickest = min((ms for ms in observed[sample.prompt_index] if ms == ms), default=float("nan"))
        ratio = sample.timing.decode_ms_per_token / quickest
        waited = sample.timing.cpu_wait_share > config.max_cpu_wait  # False where not reported (nan)
        if ratio > config.max_ratio or waited:
            found.append(Finding(sample, ratio, waited))
    return sorted(found, key=lambda f: (-f.ratio, f.sample.prompt_index, f.sample.repetition))


def _said(off: list[Finding], total: int, config: NoiseConfig) -> str:
    shown = ", ".join(str(f) for f in off[:SHOWN]) + (", ..." if len(off) > SHOWN else "")
    return (f"{len(off)} of {total} timed generations decoded over {config.max_ratio:g}x their prompt's quickest or waited for "
            f"a CPU over {config.max_cpu_wait:.0%} of the time ({shown})")


def _cause(off: list[Finding], device: str) -> str:
    load = f"load average {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} usable cores"
    if any(f.waited for f in off):
        return f"another process held this job's CPU cores ({load})"
    if device == "cuda":
        return f"another process on the GPU or on the host that launches its work, or the GPU's clocks throttled ({load})"
    return f"another process on the machine, or the CPU's clocks changed ({load})"


def _why_not_again(config: NoiseConfig, attempt: int) -> str:
    if config.reruns == 0:
        return "not run again (noise.reruns=0); they stay in the medians and the run is tagged"
    if attempt == config.reruns:
        return f"still off after noise.reruns={config.reruns}; they stay in the medians and the run is tagged"
    return (f"not run again: a ratio calls a generation off only among {EVIDENCE} or more observations of its prompt "
            "(warmup + repetitions); the run is tagged")

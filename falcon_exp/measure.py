"""Timers and memory probes around one generation. Returns plain data; knows nothing of MLflow.

Timing: a clock marks the start (device synchronised first), each new token the moment the
decoder has it (falcon_exp.decode calls back from inside generation), and the end. On a GPU the
marks are CUDA events on the device's timeline; on the CPU, perf_counter readings.
Memory: on each GPU that holds the model, the allocator's peaks (allocated and reserved) and the
process's own memory as NVML reports it; on the host, the process's peak resident memory. Peaks
are reset before the timed work; a figure that cannot be reset or read is left out, with the
reason (`MemoryProbe.unmeasured`), never replaced by a current or whole-process one.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from falcon_exp import schema
from falcon_exp.environment import nvml
from falcon_exp.records import Timing
from falcon_exp.schema import GB

if TYPE_CHECKING:
    from falcon_exp.decode import Decoder


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, perf_counter readings on the CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Each mark's time since the first (waits for the device to pass the last mark)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [self.marks[0].elapsed_time(m) / 1e3 for m in self.marks]
        return [m - self.marks[0] for m in self.marks]


def median_seconds(device: str, index: int, work: Callable[[], object], rounds: int) -> float:
    """The median time of `work` on one device (a GPU's index) over `rounds` rounds after two
    that warm up, each timed by a Clock."""
    seconds = []
    for _ in range(rounds + 2):
        with torch.cuda.device(index) if device == "cuda" else contextlib.nullcontext():
            clock = Clock(device)
            clock.mark()
            work()
            clock.mark()
            seconds.append(clock.seconds()[-1])
    return statistics.median(seconds[2:])


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


_TASKS = Path("/proc/self/task")


def cpu_wait_seconds() -> float | None:
    """Seconds this process's threads have spent ready to run but waiting for a CPU (the second
    field of Linux's /proc/self/task/*/schedstat); None where the kernel does not report it.
    Another busy process on the machine is what makes it grow."""
    total = 0
    try:
        tasks = list(_TASKS.iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except FileNotFoundError:
            if task.exists():  # a kernel without schedstat; else a thread that ended meanwhile
                return None
        except (OSError, IndexError, ValueError):
            return None
    return total / 1e9


def timed_generate(decoder: Decoder, input_ids: torch.Tensor, new_tokens: int, force_length: bool, device: str,
                   meter: EnergyMeter | None = None, attention_mask: torch.Tensor | None = None) -> tuple[Timing, list[list[int]]]:
    """One greedy generation of a batch (its rows left-padded where `attention_mask` has 0s) by a
    falcon_exp.decode decoder, timed, and its energy read given a meter. Returns (Timing, each
    sequence's token ids)."""
    clock = Clock(device)
    synchronize(device)
    waited = cpu_wait_seconds()
    drawn = meter.read() if meter else None
    clock.mark()
    generated = decoder.generate(input_ids, new_tokens, force_length, on_token=clock.mark, attention_mask=attention_mask)
    clock.mark()
    start, *stamps, end = clock.seconds()  # waits for the device: the counters are read after its work
    joules = meter.joules_since(drawn) if meter and drawn is not None else float("nan")
    after = cpu_wait_seconds()
    computing = torch.get_num_threads() if device == "cpu" else 1  # on a GPU, the thread that launches its work
    # a thread that ended during the generation takes its wait out of the sum: never below 0
    wait_share = max(0.0, after - waited) / (end * computing) if waited is not None and after is not None else float("nan")
    decode = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    timing = Timing(
        prompt_tokens=int(input_ids.shape[1]),
        new_tokens=len(generated[0]),
        generate_s=end,
        ttft_ms=stamps[0] * 1e3,
        decode_ms_per_token=decode * 1e3,
        e2e_tokens_per_s=len(generated[0]) / end,
        cpu_wait_share=wait_share,
        itl_ms=tuple((b - a) * 1e3 for a, b in zip(stamps, stamps[1:])),
        joules=joules,
        batch=int(input_ids.shape[0]),
    )
    return timing, generated


_RAPL = Path("/sys/class/powercap")


class EnergyMeter:
    """The energy counters of the devices that hold the model: NVML's total energy of each GPU
    (millijoules since the driver loaded), or on a CPU run the RAPL package domains (microjoules,
    wrapping at max_energy_range_uj). Where there is none, `unmeasured` says why."""

    def __init__(self, device: str, gpus: list[int]) -> None:
        self.unmeasured: dict[str, str] = {}
        self._gpus: list = []
        self._packages: list[tuple[Path, int]] = []
        why = self._open_gpus(gpus) if device == "cuda" else self._open_packages()
        if why:
            self.unmeasured = dict.fromkeys(schema.ENERGY, why)

    def _open_gpus(self, gpus: list[int]) -> str | None:
        why: dict[str, str] = {}
        found = _nvml_handles(gpus, why) if gpus else {}
        if not gpus or len(found) < len(gpus):
            return next(iter(why.values()), "NVML cannot see every GPU that holds the model")
        try:
            import pynvml

            for handle in found.values():
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception as error:  # noqa: BLE001 - no counter (GPUs before Volta), or NVML refuses
            return f"NVML has no total-energy counter here ({type(error).__name__}: {str(error)[:120]})"
        self._gpus = list(found.values())
        return None

    def _open_packages(self) -> str | None:
        # top-level domains only (intel-rapl:0, not its sub-domain intel-rapl:0:0, nor the MMIO copy of a package)
        domains = sorted(p for p in _RAPL.glob("intel-rapl:*") if p.name.count(":") == 1) if _RAPL.is_dir() else []
        packages = [d for d in domains if (d / "name").is_file() and (d / "name").read_text().startswith("package")]
        if not packages:
            return f"no RAPL package energy counter on this machine ({_RAPL} has none)"
        try:
            self._packages = [(d / "energy_uj", int((d / "max_energy_range_uj").read_text())) for d in packages]
            for path, _ in self._packages:
                int(path.read_text())
        except (OSError, ValueError) as error:
            return f"the RAPL counters cannot be read ({getattr(error, 'strerror', None) or error})"
        return None

    def read(self) -> list[int] | None:
        """Every counter now (in its own unit); None where there are none."""
        if self.unmeasured:
            return None
        if self._gpus:
            import pynvml

            return [int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)) for handle in self._gpus]
        return [int(path.read_text()) for path, _ in self._packages]

    def joules_since(self, before: list[int]) -> float:
        after = self.read()
        if self._gpus:
            return sum(b - a for a, b in zip(before, after)) / 1e3
        return sum((b - a) % (top + 1) for a, b, (_, top) in zip(before, after, self._packages)) / 1e6


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class MemoryProbe:
    """Peak memory since the last reset on the host and on the GPUs that hold the model."""

    def __init__(self, gpus: list[int]) -> None:
        self.gpus = gpus
        self.unmeasured: dict[str, str] = {}  # metric -> why it has no value
        self._nvml = _nvml_handles(gpus, self.unmeasured) if gpus else {}
        self._host_peak_reset: bool | str = "never reset"

    def reset(self) -> None:
        for index in self.gpus:
            torch.cuda.reset_peak_memory_stats(index)
        self._host_peak_reset = _reset_peak_rss()
        if self._host_peak_reset is not True:
            self.unmeasured[schema.PEAK_RSS_GB] = self._host_peak_reset

    def read(self) -> dict[str, float]:
        """Flat GB figures under their metric names: each GPU's own and their sums, the host's peak."""
        memory: dict[str, float] = {}
        if self._host_peak_reset is True and (peak := _peak_rss_bytes()) is not None:
            memory[schema.PEAK_RSS_GB] = peak / GB
        elif self._host_peak_reset is True:
            self.unmeasured[schema.PEAK_RSS_GB] = "no VmHWM in /proc/self/status (not Linux)"
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for index in self.gpus:
            figures = {
                schema.PEAK_ALLOCATED_GB: torch.cuda.max_memory_allocated(index) / GB,
                schema.PEAK_RESERVED_GB: torch.cuda.max_memory_reserved(index) / GB,
            }
            if index in self._nvml and (used := _nvml_process_bytes(self._nvml[index], self.unmeasured)) is not None:
                figures[schema.PROCESS_GB] = used / GB
            for key, value in figures.items():
                memory[schema.cuda_memory(index, key)] = value
                sums[key], counts[key] = sums.get(key, 0.0) + value, counts.get(key, 0) + 1
        # a sum over only some of the model's GPUs is no sum
        return memory | {key: value for key, value in sums.items() if counts[key] == len(self.gpus)}


def _reset_peak_rss() -> bool | str:
    """Linux resets the resident high-water mark (VmHWM) on writing 5 to clear_refs. True, or why not."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError as error:
        return f"the host's peak could not be reset ({_CLEAR_REFS}: {error.strerror or error})"


def _peak_rss_bytes() -> int | None:
    if not _STATUS.exists():
        return None
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def _nvml_handles(gpus: list[int], unmeasured: dict[str, str]) -> dict:
    """NVML handles of torch's devices, matched by UUID (NVML's order need not be torch's)."""
    try:
        pynvml = nvml()
        return {i: pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(i).uuid}") for i in gpus}
    except Exception as error:  # noqa: BLE001 - no NVML (not installed, no driver): say so
        unmeasured[schema.PROCESS_GB] = f"NVML unavailable ({type(error).__name__}: {str(error)[:120]})"
        return {}


def _nvml_process_bytes(handle: Any, unmeasured: dict[str, str]) -> int | None:
    import pynvml

    try:
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except pynvml.NVMLError as error:
        unmeasured[schema.PROCESS_GB] = f"NVML cannot list processes ({error})"
        return None
    mine = [p.usedGpuMemory for p in processes if p.pid == os.getpid()]
    if not mine or mine[0] is None:
        unmeasured[schema.PROCESS_GB] = "NVML does not report this process's memory (another PID namespace, or no permission)"
        return None
    return int(mine[0])

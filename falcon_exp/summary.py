"""What a sweep prints at its end: a table of its runs (names never cut) and how to open the UI."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from falcon_exp import schema
from falcon_exp.store import shown_uri

if TYPE_CHECKING:
    from mlflow.entities import Run


def print_summary(children: list[Run]) -> None:
    """A table of a sweep's runs (names never cut), and the command that opens the UI."""
    nan = float("nan")
    names = [(run.info.run_name or run.info.run_id).split(",") for run in children]
    common = set.intersection(*map(set, names)) if names else set()
    jobs = [",".join(part for part in name if part not in common) or ",".join(name) for name in names]
    width = max([len("job"), *map(len, jobs)])
    modes = [run.data.params.get(schema.PARAM_MODE, "?") for run in children]
    mode_width = max([6, *map(len, modes)])
    header = f"{'mode':<{mode_width}} {'job':<{width}} {'status':<9} {'weights_gb':>10} {'peak_gb':>8} {'ms/token':>9} {'decode tok/s':>12}"
    lines = [header, "-" * len(header)]
    for run, job, mode in zip(children, jobs, modes):
        m = run.data.metrics
        peak = next((m[key] for key in schema.PEAK_MEMORY if key in m), nan)
        lines.append(
            f"{mode:<{mode_width}} {job:<{width}} {run.info.status:<9} "
            f"{m.get(schema.WEIGHTS_GB, nan):>10.3f} {peak:>8.3f} "
            f"{m.get(schema.DECODE_MS_PER_TOKEN, nan):>9.1f} {m.get(schema.DECODE_TOKENS_PER_S, nan):>12.2f}"
        )
    lines.append("peak_gb: allocator peak (a sum of per-GPU peaks), or the process's peak resident memory on a CPU")
    uri = shown_uri()
    lines.append(f"runs are in {uri}; compare them with: mlflow ui --backend-store-uri {uri}")
    print("\n".join(lines), file=sys.stderr, flush=True)

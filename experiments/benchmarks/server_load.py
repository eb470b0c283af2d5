"""N concurrent jobs writing to one tracking server: does every run, metric and artifact arrive?

For each N, one real sweep of N jobs (the tiny Falcon, N seeds, joblib with N workers) against the
server at --uri, each sweep in its own experiment; then every run is read back and checked: all N
FINISHED under their parent, every run with the same metric names as the others, and each run's
per-sample decode times (metrics, in the server's database) equal to the same numbers in its
generations.jsonl (an artifact, in the server's artifact store): two paths from one record.
Writes a CSV and a figure.

    python experiments/benchmarks/server_load.py --uri http://127.0.0.1:5000 --jobs 1 2 4 8 \
        --out experiments/results/server-load
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from mlflow import MlflowClient

from falcon_exp import schema

JOB = ["model=tiny-falcon", "max_length=null", "max_new_tokens=6", "repetitions=2", "warmup=1", "quality.enabled=false"]
PROMPTS = "- Name three colours.\n- What is an A/B test?\n"


def sweep(uri: str, jobs: int, experiment: str, folder: Path) -> float:
    """Run one sweep of `jobs` concurrent jobs; returns its wall seconds."""
    seeds = ",".join(str(s) for s in range(jobs))
    command = [sys.executable, "-m", "falcon_exp", "-m", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}", f"seed={seeds}",
               "bits=4", *JOB, f"prompts.file={folder / 'two.yaml'}", f"tracking.experiment={experiment}"]
    start = time.monotonic()
    done = subprocess.run(command, cwd=folder, env=os.environ | {"MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the sweep of {jobs} jobs failed:\n{done.stderr[-3000:]}")
    return time.monotonic() - start


def read_back(client: MlflowClient, experiment: str, jobs: int) -> dict[str, int]:
    """What arrived, and every disagreement counted."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=10000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in {p.info.run_id for p in parents}]
    names = {frozenset(c.data.metrics) for c in children}
    points = mismatched = 0
    for child in children:
        rows = [json.loads(line) for line in Path(client.download_artifacts(child.info.run_id, "generations.jsonl")).read_text().splitlines()]
        history = sorted(client.get_metric_history(child.info.run_id, schema.sample(schema.DECODE_MS_PER_TOKEN)), key=lambda m: m.step)
        mismatched += [m.value for m in history] != [r["decode_ms_per_token"] for r in rows]
        points += sum(len(client.get_metric_history(child.info.run_id, key)) for key in child.data.metrics)
    return {"runs_expected": jobs, "runs_finished": sum(c.info.status == "FINISHED" for c in children),
            "parents": len(parents), "metric_name_sets": len(names), "metric_points": points, "runs_mismatched": mismatched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", required=True, help="the tracking server, e.g. http://127.0.0.1:5000")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", type=Path, default=Path("server-load"))
    args = parser.parse_args()
    client, rows, stamp = MlflowClient(args.uri), [], time.strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "two.yaml").write_text(PROMPTS)
        for jobs in args.jobs:
            experiment = f"load-{stamp}-{jobs}"
            wall_s = sweep(args.uri, jobs, experiment, Path(folder))
            rows.append({"jobs": jobs, "wall_s": round(wall_s, 1)} | read_back(client, experiment, jobs))
            print(rows[-1], flush=True)
    per_job = rows[0]["metric_points"] / rows[0]["jobs"]  # what one job alone writes
    for row in rows:
        row["metric_points_expected"] = round(per_job * row["jobs"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = [str(r["jobs"]) for r in rows]
    at = range(len(rows))
    left.bar([i - 0.2 for i in at], [r["runs_expected"] for r in rows], 0.4, label="jobs started")
    left.bar([i + 0.2 for i in at], [r["runs_finished"] - r["runs_mismatched"] for r in rows], 0.4, label="runs read back, intact")
    left.set(xticks=list(at), xticklabels=labels, xlabel="concurrent jobs", ylabel="runs", title="Runs")
    left.legend(fontsize=8)
    right.bar([i - 0.2 for i in at], [r["metric_points_expected"] for r in rows], 0.4, label="written (jobs x one job's)")
    right.bar([i + 0.2 for i in at], [r["metric_points"] for r in rows], 0.4, label="read back")
    right.set(xticks=list(at), xticklabels=labels, xlabel="concurrent jobs", ylabel="metric points", title="Metric points")
    right.legend(fontsize=8)
    figure.suptitle("Sweeps of N concurrent jobs (joblib) against one mlflow server on PostgreSQL", fontsize=10)
    figure.tight_layout()
    figure.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

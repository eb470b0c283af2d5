"""`python -m falcon_exp.analysis`: tables and figures from the runs in the MLflow store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from falcon_exp.analysis import analyse
from falcon_exp.config import FalconExpError


def main(argv: list[str] | None = None) -> int:
    from falcon_exp.tracking import log_figures, shown_uri, tracking_uri

    parser = argparse.ArgumentParser(prog="falcon-exp-analysis", description=__doc__)
    parser.add_argument("--experiment", default="falcon-exp", help="MLflow experiment (default: falcon-exp)")
    parser.add_argument("--sweep", default="latest", help="a sweep's parent run id, 'latest' (default), or 'all' for every run")
    parser.add_argument("--filter", default="", help="an MLflow filter, e.g. \"params.bits = '4'\"")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="output folder (default: ./figures)")
    parser.add_argument("--log", action="store_true", help="also log the files to the sweep's parent run")
    args = parser.parse_args(argv)
    uri = tracking_uri()
    try:
        loaded, written = analyse(uri, args.out, args.experiment, None if args.sweep == "all" else args.sweep, args.filter)
    except FalconExpError as error:
        print(f"falcon-exp: error: {error}", file=sys.stderr)
        return 2
    print(f"read {len(loaded.runs)} runs of {loaded.source} from {shown_uri(uri)}")
    for line in loaded.skipped:
        print(f"left out: {line}")
    if not written:
        print("falcon-exp: nothing to analyse: no finished run with timing metrics in what was selected", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if args.log and loaded.parent_run_id:
        log_figures(loaded.parent_run_id, written)
        print(f"logged them to the sweep's run {loaded.parent_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

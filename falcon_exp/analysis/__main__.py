"""`python -m falcon_exp.analysis`: tables and figures from the runs in the MLflow store."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from falcon_exp.analysis import analyse
from falcon_exp.checks import writable_folder
from falcon_exp.console import say_error, stop_on_signals, stopped_by
from falcon_exp.errors import FalconExpError
from falcon_exp.failures import exit_code
from falcon_exp.store import redact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="falcon-exp-analysis", description=__doc__)
    parser.add_argument("--experiment", default="falcon-exp", help="MLflow experiment (default: falcon-exp)")
    parser.add_argument("--sweep", default="latest", help="a sweep's parent run id, 'latest' (default), or 'all' for every run")
    parser.add_argument("--filter", default="", help="an MLflow filter, e.g. \"params.bits = '4'\"")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="output folder (default: ./figures)")
    parser.add_argument("--log", action="store_true", help="also log the files to the sweep's parent run")
    args = parser.parse_args(argv)
    stop_on_signals()
    try:
        return _analyse(args)
    except FalconExpError as error:
        say_error(error)
        return exit_code(error)
    except OSError as error:  # a full disk, a folder made read-only meanwhile
        say_error(f"could not write the analysis under --out {str(args.out)!r}: {error.strerror or error}")
        return exit_code(error)
    except KeyboardInterrupt as error:  # files are written whole or not at all: nothing half-written is left
        say_error(f"stopped by {stopped_by(error)}; no file was left half-written")
        return exit_code(error)
    except Exception as error:  # noqa: BLE001 - a fault of the analysis or of MLflow: its traceback, without secrets
        print(redact("".join(traceback.format_exception(error))), file=sys.stderr, flush=True)
        return exit_code(error)


def _analyse(args: argparse.Namespace) -> int:
    from falcon_exp.store import shown_uri, tracking_uri
    from falcon_exp.tracking import log_figures

    uri = tracking_uri()
    writable_folder(f"--out {str(args.out)!r}", args.out, "give a folder the tables and figures can be written to")
    loaded, written = analyse(uri, args.out, args.experiment, None if args.sweep == "all" else args.sweep, args.filter)
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

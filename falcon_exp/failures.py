"""How a failure ends falcon-exp: its one line, its exit code, and what it leaves in MLflow. The
rest of the package raises; the entry points (the command, Hydra's job, the sweep's callbacks)
end through `ending`, the analysis through `exit_code`."""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Callable, Iterator

from falcon_exp.console import one_line, say_error, signal_number, stopped_by
from falcon_exp.errors import FalconExpError, JobFailed
from falcon_exp.store import redact

EXIT_FAILED = 1  # a job or a sweep failed at run time; its runs say why
EXIT_BAD_INPUT = 2  # the user's to fix: nothing loaded, nothing logged


def exit_code(error: BaseException) -> int:
    """Stopped by a signal: 128 + its number; bad input (an error the user can fix): 2; failed at
    run time, or a fault: 1."""
    if isinstance(error, KeyboardInterrupt):
        return 128 + signal_number(error)
    return EXIT_BAD_INPUT if isinstance(error, FalconExpError) and not isinstance(error, JobFailed) else EXIT_FAILED


def status_after(error: BaseException) -> str:
    """How a run that an exception ends is closed: KILLED by a signal, else FAILED."""
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


@contextlib.contextmanager
def ending(close: Callable[[str, str], bool] | None = None) -> Iterator[None]:
    """A failure that reaches here ends the process in one line, without a traceback. With
    `close` (`close(why, status)` closes the sweep this process opened and says whether it did),
    a signal, a file Hydra could not write and any other exception (its traceback, without
    secrets) end here too; without it they go on up."""
    try:
        yield
    except JobFailed as error:
        if str(error):  # else the failing job has said it
            say_error(error)
        sys.exit(EXIT_FAILED)
    except FalconExpError as error:
        say_error(error)
        sys.exit(EXIT_BAD_INPUT)
    except OSError as error:  # Hydra could not write a job's files (a full disk)
        if close is None:
            raise
        what = "; its sweep is FAILED in MLflow" if close(f"could not write: {error}", status_after(error)) else ""
        say_error(f"could not write {error.filename or 'the job files Hydra keeps'}: {error.strerror or error}{what}")
        sys.exit(exit_code(error))
    except KeyboardInterrupt as error:  # Ctrl-C, SIGTERM, SIGHUP: the runs are KILLED in MLflow
        if close is None:
            raise
        name = stopped_by(error)
        what = "the running job and its sweep are" if close(f"stopped by {name}", status_after(error)) else "the running job is"
        print(f"falcon-exp: stopped by {name}; {what} KILLED in MLflow (resume=true re-runs what did not finish)",
              file=sys.stderr, flush=True)
        sys.exit(exit_code(error))
    except Exception as error:  # a fault of falcon-exp's or a library's: its traceback, without secrets
        if close is None:
            raise
        close(f"failed: {one_line(error)}", status_after(error))
        print(redact("".join(traceback.format_exception(error))), file=sys.stderr, flush=True)
        sys.exit(EXIT_FAILED)

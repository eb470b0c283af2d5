"""What a user reads: log messages (Hydra configures the handlers, so they reach the terminal and
the job's log file), one-line errors, and third-party noise shown once or turned into one
informative line."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import traceback
from typing import Any

from falcon_exp.store import redact

log = logging.getLogger("falcon_exp")


def one_line(error: BaseException) -> str:
    """An exception as one line for a log or a tag: its type, its first line, no secret."""
    text = str(error).strip().splitlines()
    return redact(f"{type(error).__name__}: {text[0] if text else ''}")[:500]


def say_error(error: BaseException | str) -> None:
    """The one line an error is shown as: no traceback, no secret of the store's address."""
    print(redact(f"falcon-exp: error: {error}"), file=sys.stderr, flush=True)


class Stopped(KeyboardInterrupt):
    """A signal asked the process to stop: Ctrl-C (SIGINT), a cluster's time limit or pre-emption
    (SIGTERM), a closed terminal (SIGHUP). Handled as Ctrl-C is: the running job's run and its
    sweep end as KILLED. `name` says what stopped it: the signal, or why it came."""

    def __init__(self, signum: int, why: str | None = None) -> None:
        self.signum, self.name = signum, why or signal.Signals(signum).name
        super().__init__(self.name)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_on_signals() -> None:
    """Turn SIGINT, SIGTERM and SIGHUP into `Stopped`. Once stopping, further signals wait: the
    runs are being closed in MLflow, and a second Ctrl-C must not leave them RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals reach the main thread only

    def waiting(signum: int, frame: Any) -> None:
        print(f"falcon-exp: {signal.Signals(signum).name} while stopping: closing the runs in MLflow first", file=sys.stderr, flush=True)

    def stop(signum: int, frame: Any, why: str | None = None) -> None:
        for other in STOP_SIGNALS:
            signal.signal(other, waiting)
        raise Stopped(signum, why)

    for each in STOP_SIGNALS:
        signal.signal(each, stop)
    submitit_handler = signal.getsignal(signal.SIGUSR2)
    if type(getattr(submitit_handler, "__self__", None)).__name__ == "SignalHandler":  # a SLURM job of submitit's

        def at_time_limit(signum: int, frame: Any) -> None:
            """SLURM's time limit first arrives as SIGUSR2 (hydra.launcher.signal_delay_s before it); unless
            it requeues the job (hydra.launcher.max_num_timeout), submitit's handler then raises its
            UncompletedJobError wherever the job is. That stops the job as a cancellation does."""
            try:
                submitit_handler(signum, frame)
            except Exception:  # noqa: BLE001 - submitit's UncompletedJobError: no requeue, the job is over
                stop(signum, frame, "SLURM's time limit (SIGUSR2 from submitit)")

        signal.signal(signal.SIGUSR2, at_time_limit)


def stopped_by(error: BaseException) -> str:
    return error.name if isinstance(error, Stopped) else "SIGINT"


def signal_number(error: BaseException) -> int:
    return error.signum if isinstance(error, Stopped) else signal.SIGINT.value


class ConsoleFormatter(logging.Formatter):
    """`falcon-exp: message` for the project's own lines (`falcon-exp: warning: ...` above INFO),
    `name: LEVEL: message` for a library's."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == "falcon_exp" or record.name.startswith("falcon_exp."):
            level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
            return f"falcon-exp: {level}{message}"
        return f"{record.name}: {record.levelname}: {message}"


class _Redacted(logging.Filter):
    """No secret of the store's address in a line that reaches the terminal or a log, whoever
    logs it (MLflow and SQLAlchemy print addresses and tracebacks with them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call: the handler reports it as logging does
            return True
        if (shown := redact(message)) != message:
            record.msg, record.args = shown, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        return True


def guard_log_handlers() -> None:
    """Put the redacting filter on every handler that prints: the root logger's (Hydra's console
    and log file) and those of loggers that keep their own (MLflow's)."""
    loggers = [logging.getLogger(), *(each for each in logging.Logger.manager.loggerDict.values() if isinstance(each, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, _Redacted) for f in handler.filters):
                handler.addFilter(_Redacted())


class Once(logging.Filter):
    """Each distinct message once per process (bitsandbytes logs that int8 inputs are cast to
    float16 at every matmul, tens of thousands of lines per job)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        first = message not in self.seen
        self.seen.add(message)
        return first


class _Reported(logging.Filter):
    """MLflow logs a store's database error with its traceback before raising it; falcon-exp
    reports the error it raises, in one line (a full disk: `database or disk is full`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SQLAlchemy database error" not in record.getMessage()


class Expected(logging.Filter):
    """Warnings that say nothing about a run, kept out of the job's log: a library's import that
    tries CUDA kernel libraries and Triton even where torch has no CUDA (torchao's, which
    transformers imports wherever it is installed), or uses an API torch has deprecated."""

    EXPECTED = ("Failed to load", "Detected no triton", "is an Enum subclass and is now natively supported")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.EXPECTED)


_INSTALLED: list[tuple[logging.Logger, logging.Filter]] = []


def quiet_third_party() -> None:
    """Install the filters above (once per process), before the libraries are imported so that
    their import-time warnings meet them too; once transformers is imported, turn off its progress
    bars, whose lines would fill a job's log (the load time is logged as time/load_s)."""
    if "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()
    if _INSTALLED:
        return
    logging.raiseExceptions = False  # a line the log file cannot take (a full disk) is not a traceback on the terminal
    from falcon_exp import backends

    filters = [("torch.utils._pytree", Expected()), ("mlflow.store.db.utils", _Reported())]
    for name, installed in filters + [f for method in backends.REGISTRY.values() for f in method.log_filters()]:
        logger = logging.getLogger(name)
        logger.addFilter(installed)
        _INSTALLED.append((logger, installed))

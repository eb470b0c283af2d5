"""The errors a user can fix, shown as one line without a traceback. Torch-free: the analysis
raises them too."""

from __future__ import annotations


class FalconExpError(Exception):
    """An error the user can fix; printed as one line, without a traceback."""


class ConfigError(FalconExpError):
    """Bad input, found before anything was loaded or logged."""


class JobFailed(FalconExpError):
    """A job or a sweep that failed at run time, its runs logged as such; empty where the failing
    job has said why already."""

"""Errors a user can act on. The CLI prints these as one line (no traceback) and exits with status 2.

Every message names the problem and the fix. Raise them before any work is done or any file written.
"""

from __future__ import annotations


class SlimGPTError(Exception):
    """Base class: a problem with the user's input or environment, with a one-line fix."""


class ConfigError(SlimGPTError, ValueError):
    """An invalid option value (ratio out of range, unknown schedule, ...)."""


class UnsupportedModelError(SlimGPTError):
    """The model's ``config.model_type`` has no adapter."""


class DataError(SlimGPTError):
    """Calibration or evaluation data is missing, unavailable offline, or too short."""


class OutputExistsError(SlimGPTError):
    """The output directory exists and ``--overwrite`` was not given."""


class NumericalError(SlimGPTError):
    """A Hessian stayed non-positive-definite after raising the damping."""

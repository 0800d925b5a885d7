"""Errors a user can act on. Each carries one sentence that says what went wrong and what to do.

The command line prints ``str(error)`` and exits with a non-zero status instead of a traceback.
"""


class ImpusError(Exception):
    """Base class of every error impus_lite raises on purpose."""


class InputError(ImpusError, ValueError):
    """A bad image, prompt or option given by the user."""


class ModelLoadError(ImpusError, OSError):
    """A model that cannot be found or loaded (offline, wrong id, broken folder)."""

"""tympan's error types: everything the library raises on purpose derives from :class:`TympanError`.

The command line turns any :class:`TympanError` into one line on stderr (exit status 2 when fatal, 1 when only
some inputs were skipped); anything else escaping is a bug. The subclasses also derive from the built-in type a
caller would have caught before (``ValueError``, ``RuntimeError``, ``OSError``), so existing ``except`` clauses
keep working.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "InputError", "OutputError", "ResumeError", "TympanError"]


class TympanError(Exception):
    """Base of every error tympan raises deliberately; the message is one line."""


class CheckpointError(TympanError, RuntimeError):
    """A checkpoint cannot be read or does not fit the model (re-exported by :mod:`tympan.checkpoints`)."""


class ConfigError(TympanError, ValueError):
    """A recipe, override or model config that cannot be used; the message names the key and the reason."""


class InputError(TympanError, ValueError):
    """In-memory input that cannot be used (wrong dtype or shape, NaN/inf samples, an empty batch)."""


class OutputError(TympanError, OSError):
    """A result that cannot be written (disk full, not a folder, permission denied)."""


class ResumeError(TympanError, RuntimeError):
    """A training run that cannot continue from its checkpoint (truncated file, other model or world size)."""

"""Exceptions raised by the trimdb library.

The library raises these and never exits the process; the command-line front end turns them
into messages and exit codes.
"""

from __future__ import annotations


class TrimdbError(Exception):
    """Base class of every error that trimdb raises on purpose."""


class InputError(TrimdbError):
    """A corpus or target record that cannot be read, with its location.

    ``line`` is the 1-based line of a JSONL file, the 1-based element of a JSON array, or the
    1-based row of a Parquet file. ``field`` is the record field at fault, when there is one.
    """

    def __init__(self, path: str, line: int | None, field: str | None, reason: str, hint: str = ""):
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = reason
        self.hint = hint
        where = self.path if line is None else f"{self.path}:{line}"
        if field:
            where += f": field {field!r}"
        message = f"{where}: {reason}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class RenderError(TrimdbError):
    """A sample that cannot be rendered into tokens under the model's chat template."""


class ModelError(TrimdbError):
    """A model that cannot be found, fetched or loaded."""


class ModelMismatchError(TrimdbError):
    """A query whose model differs from the one that built the index."""


class StorageError(TrimdbError):
    """A database or vector file that is missing, inconsistent or from another trimdb version."""


class SettingsError(TrimdbError):
    """An invalid setting, such as a budget of 0 or an unknown scope."""

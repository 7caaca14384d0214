"""One exception type for every user-facing problem.

`dgex` commands catch :class:`DgexError` at the top level and print its message
as a single line (problem + fix) with a non-zero exit status, so bad input never
produces a Python traceback or a half-written output.
"""


class DgexError(Exception):
    """A problem with the user's input or configuration; the message says how to fix it."""


class InputError(DgexError):
    """Bad input data: wrong ids, NaN values, corrupt or wrongly shaped files."""


class ConfigError(DgexError):
    """Bad configuration or command-line values."""


class DownloadError(DgexError):
    """A download failed or did not verify."""


class StorageError(DgexError):
    """An output could not be written (disk full, read-only, no permission, a file or folder in the way)."""

"""Domain errors. The CLI turns each into one `Error: ...` line and its exit code."""


class SuperweightError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""

    exit_code = 1


class UsageError(SuperweightError):
    """A malformed option value (exit code 2, like click's usage errors)."""

    exit_code = 2


class CoordinateError(UsageError):
    """A weight coordinate that does not parse or does not fit the model."""


class ModelLoadError(SuperweightError):
    """A model spec that names nothing loadable."""


class UnsupportedArchitectureError(SuperweightError):
    """A model family whose down-projections superweight does not know how to find."""


class CorpusError(SuperweightError):
    """A corpus spec that names no text, or only empty text."""


class RunDirInUseError(SuperweightError):
    """A run directory that another process is writing to (io/lock.py): one writer at a time."""

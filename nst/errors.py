"""Error types users can catch; each message names the file, pair or parameter at fault."""


class NSTError(Exception):
    """Base class of every error this package raises on purpose."""


Loc = tuple[str | int, ...]


class ParamsError(NSTError, ValueError):
    """A parameter has a bad value (message: `where.field: problem`); `problems` holds (field location, message)."""

    def __init__(self, message: str, problems: list[tuple[Loc, str]] | None = None) -> None:
        super().__init__(message)
        self.problems: list[tuple[Loc, str]] = problems if problems is not None else [((), message)]


class ImageError(NSTError):
    """An input image is missing, unreadable, truncated or too large."""


class WeightsError(NSTError):
    """VGG weights could not be found or do not fit the network."""


class ManifestError(NSTError):
    """A manifest is invalid; the message lists every problem with its location."""


class StorageError(NSTError):
    """A storage URI could not be read or written; `transient` if trying again later may succeed (outage, 5xx)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class OutputError(NSTError):
    """An output could not be written (e.g. directory not writable)."""


class OutOfMemory(NSTError):
    """A batch did not fit in device memory; the caller may split it and try the halves."""

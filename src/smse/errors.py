"""Exceptions that name the file or field at fault."""


class SmseError(Exception):
    """Base class for errors the command line reports without a traceback, as ``error: ...`` and ``exit_code``."""

    exit_code = 2


class ConfigError(SmseError):
    """A configuration value is missing, unknown or out of range."""


class DataError(SmseError):
    """A dataset on disk does not have the expected layout or names."""


class ImageError(DataError):
    """An image file cannot be read as an RGB image."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class SlideError(DataError):
    """A whole-slide image cannot be opened, lacks its resolution, or holds no tissue."""


class LeakageError(DataError):
    """A split puts a patient or an identical image on both sides."""


class CheckpointError(SmseError):
    """A run folder or checkpoint is missing, incomplete or from another version."""


class OutputError(SmseError):
    """A file or folder cannot be written (no permission, a file in the way, a full disk)."""


class RunLockedError(SmseError):
    """Another process is training into the same run folder."""


class TrainingDiverged(SmseError):
    """The loss, the weights or the model's outputs became NaN or infinite."""


class Interrupted(SmseError):
    """The user interrupted a run (Ctrl-C); what was saved can be resumed."""

    exit_code = 130


__all__ = [
    "SmseError",
    "ConfigError",
    "DataError",
    "ImageError",
    "SlideError",
    "LeakageError",
    "CheckpointError",
    "OutputError",
    "RunLockedError",
    "TrainingDiverged",
    "Interrupted",
]

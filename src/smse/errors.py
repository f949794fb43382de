"""Exceptions that name the file or field at fault."""


class SmseError(Exception):
    """Base class for errors the command line reports without a traceback."""


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


class TrainingDiverged(SmseError):
    """The loss became NaN or infinite."""

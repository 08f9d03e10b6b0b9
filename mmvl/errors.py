"""Exception types raised by mmvl for bad user input: each message names the file, the field and the fix."""

from __future__ import annotations

import os


class MMVLError(Exception):
    """Base class for every error mmvl raises on purpose."""


class ConfigError(MMVLError, KeyError):
    """A config file or a ``--cfg-options`` override is wrong (unknown key, bad value, missing base)."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class RegistryError(ConfigError):
    """A ``type=`` name is not registered; the message lists the registered names."""


class DataError(MMVLError):
    """A data file (image, manifest, report) cannot be used; ``path`` names it."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class DicomError(DataError):
    """A DICOM file cannot be read or decoded."""


class ManifestError(DataError):
    """A manifest row is malformed or points at a missing file."""


class CheckpointError(MMVLError):
    """A checkpoint is missing, truncated or does not match the model."""


class TrainingError(MMVLError):
    """Training cannot go on (for example repeated non-finite losses)."""

"""Errors a user can cause.

A :class:`LandlensError` is printed by the CLI as one line (no traceback): it must name the
thing that is wrong (a path, a backbone name, a checkpoint) and, where possible, what to do.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LandlensError(Exception):
    """A problem with the user's input or environment, reported as one clear line."""


class DatasetError(LandlensError):
    """A dataset folder, manifest or catalog entry that cannot be used."""


class ImageReadError(LandlensError):
    """One image file that cannot be decoded (corrupt, truncated, empty, not an image, too large)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class WeightsError(LandlensError):
    """Pretrained weights that cannot be found, loaded or verified."""


class BackboneError(LandlensError):
    """An unknown or unusable backbone name."""


class FeatureStoreError(LandlensError):
    """A feature store that is missing, corrupt, or does not match the requested extraction."""


class ConfigError(LandlensError):
    """A training or grid configuration with an unknown key or an invalid value."""


class CheckpointError(LandlensError):
    """A run directory, checkpoint or model file that is missing, corrupt, or does not match."""


class FeatureMismatchError(LandlensError):
    """Features whose shape or identity does not fit a trained network (e.g. a matching discriminator)."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (or its type), shortened to ``limit`` characters."""
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."

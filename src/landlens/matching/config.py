"""Configuration of residual-dyad matching runs (autoencoder pre-training and fine-tuning, discriminator).

Method: N. Khurshid, Mohbat, M. Taj, F. Z. Qureshi, "A Residual-Dyad Encoder Discriminator
Network for Remote Sensing Image Matching". The defaults follow the paper's optimisation:
SGD with an initial learning rate of 0.001, the rate multiplied by 0.2 when the validation
loss stops improving, and early stopping after 10 epochs without improvement.

A :class:`MatchingConfig` is read like a classification config (both are
:class:`~landlens.config.RunConfig` models): a YAML or JSON file of sections, then
``section.key=value`` overrides read by the key's type (``optim.lr=0.01``,
``ae.widths=[4,8,8]``, ``out=runs/m``). Unknown sections or keys and invalid values raise
:class:`~landlens.errors.ConfigError`, one line naming the key, the value and what it accepts.
Sections:

``data``
    ``path`` (image folder; for pre-training any folder, searched recursively), ``dataset``
    (catalog name), ``split`` and ``seed`` (the train/test division of the target dataset),
    ``input_size`` (autoencoder input side: 64 times a power of two), ``resize_mode``,
    ``batch_size``, ``num_workers``, ``val_fraction`` (share of the training images held out
    for the validation loss).
``ae``
    the :class:`~landlens.matching.networks.AEConfig` fields ``kind``, ``widths``,
    ``latent_channels`` (the input side is ``data.input_size``), and ``init`` (the run
    directory of an autoencoder to start from; fine-tuning sets it).
``dml``
    the :class:`~landlens.matching.networks.DMLConfig` fields ``kind`` and ``width`` (the
    input shape comes from the features).
``features``
    what the discriminator compares: ``ae`` (an autoencoder run directory, whose latent maps
    are used) or ``backbone`` with ``weights`` (pooled CNN features, seen as ``(D, 1, 1)``
    maps); ``cache_dir`` is the feature cache.
``optim``
    ``name`` (``sgd`` or ``adam``), ``lr``, ``momentum``, ``weight_decay``,
    ``plateau_factor`` and ``plateau_patience`` (``ReduceLROnPlateau`` on the validation
    loss), ``epochs`` (maximum) and ``patience`` (early stopping; ``null`` turns it off).
``pairs``
    ``per_epoch`` training pairs drawn afresh every epoch, ``positive_fraction`` of them
    matching, ``val_pairs`` fixed validation pairs, ``seed``, ``augment`` (``dihedral``: the
    two maps of each training pair turned and flipped by independent random elements of D4,
    so the discriminator learns that a scene's layout may lie in any orientation; ``none``).
``trainer``
    ``seed`` (weights and data order), ``accelerator``, ``devices``, ``precision``,
    ``log_every_n_steps``.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Literal, Mapping, Sequence, get_args

from pydantic import BeforeValidator, Field

from landlens.config import RunConfig, Section, int_as_text, merge_config_dicts
from landlens.errors import ConfigError, LandlensError, first_line
from landlens.matching.networks import AEConfig

Kind = Literal["resdyad", "res"]  # landlens.matching.networks.KINDS
MatchOptimizer = Literal["sgd", "adam"]
MatchPrecision = Annotated[Literal["32", "32-true", "16-mixed", "bf16-mixed"], BeforeValidator(int_as_text)]

MATCH_OPTIMIZERS: tuple[str, ...] = get_args(MatchOptimizer)
MATCH_PRECISIONS: tuple[str, ...] = get_args(get_args(MatchPrecision)[0])


class MatchDataConfig(Section):
    """Images and how they are divided and fed (see the module docstring)."""

    path: str = ""
    dataset: str | None = None
    split: str = "80/20"
    seed: int = 0
    input_size: int = Field(64, ge=1)
    resize_mode: Literal["crop", "squash"] = "squash"
    batch_size: int = Field(32, ge=1)
    num_workers: int = Field(2, ge=0)
    val_fraction: float = Field(0.1, ge=0, lt=1)


class AESection(Section):
    """Autoencoder architecture (:class:`~landlens.matching.networks.AEConfig` less the input
    side, which is ``data.input_size``) and the run it starts from."""

    kind: Kind = "resdyad"
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=3, max_length=3)
    latent_channels: int = Field(512, ge=1)
    init: str | None = None


class DMLSection(Section):
    """Discriminator architecture: ``kind`` (``resdyad`` or ``res``) and ``width``."""

    kind: Kind = "resdyad"
    width: int = Field(128, ge=1)


class FeaturesSection(Section):
    """The features a discriminator is trained on: an autoencoder run, or a backbone."""

    ae: str | None = None
    backbone: str | None = None
    weights: str = "auto"
    cache_dir: str = "runs/features"


class MatchOptimConfig(Section):
    """Optimiser, plateau schedule and early stopping (paper: SGD, 0.001, x0.2, 10 epochs)."""

    name: MatchOptimizer = "sgd"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    plateau_factor: float = Field(0.2, gt=0, lt=1)
    plateau_patience: int = Field(5, ge=0)
    epochs: int = Field(100, ge=1)
    patience: int | None = Field(10, ge=1)


class PairsConfig(Section):
    """Pair sampling of discriminator training."""

    per_epoch: int = Field(10000, ge=2)
    positive_fraction: float = Field(0.5, gt=0, lt=1)
    val_pairs: int = Field(2000, ge=0)
    seed: int = 0
    augment: Literal["none", "dihedral"] = "none"


class MatchTrainerConfig(Section):
    """How Lightning runs the loop."""

    seed: int = 0
    accelerator: str = "auto"
    devices: int | list[int] | str = 1
    precision: MatchPrecision = "32-true"
    log_every_n_steps: int = Field(10, ge=1)


class MatchingConfig(RunConfig):
    """One matching run: data, autoencoder, discriminator, features, optimiser, pairs, trainer, output."""

    data: MatchDataConfig = Field(default_factory=MatchDataConfig)
    ae: AESection = Field(default_factory=AESection)
    dml: DMLSection = Field(default_factory=DMLSection)
    features: FeaturesSection = Field(default_factory=FeaturesSection)
    optim: MatchOptimConfig = Field(default_factory=MatchOptimConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    trainer: MatchTrainerConfig = Field(default_factory=MatchTrainerConfig)
    out: str = "runs/matching/run"

    def ae_config(self) -> AEConfig:
        """The :class:`AEConfig` of the ``ae`` section at ``data.input_size`` (RGB input)."""
        try:
            return AEConfig(kind=self.ae.kind, input_size=self.data.input_size, in_channels=3,
                            widths=tuple(self.ae.widths), latent_channels=self.ae.latent_channels)
        except ConfigError as exc:
            raise ConfigError(f"ae / data.input_size: {first_line(exc)}") from None
        except TypeError as exc:
            raise ConfigError(f"ae: {first_line(exc)}") from None

    def validate(self) -> "MatchingConfig":  # type: ignore[override]
        """Check what spans several keys (each key's type, choices and range are checked on construction)."""
        if self.features.ae and self.features.backbone:
            raise ConfigError("features.ae and features.backbone are both set: the discriminator compares one kind "
                              "of features; drop one")
        self.ae_config()
        return self


def matching_config_from_dict(raw: Mapping[str, Any], source: str = "config") -> MatchingConfig:
    """Build a :class:`MatchingConfig` from nested dicts, refusing unknown sections and keys.

    Types, choices and ranges are checked; :meth:`MatchingConfig.validate` is not run.
    """
    return MatchingConfig.from_dict(raw, source)


def apply_matching_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides, read by the matching keys' types, to nested dicts (a copy)."""
    return MatchingConfig.with_overrides(raw, overrides)


def load_matching_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (), *,
                         base: Mapping[str, Any] | None = None) -> MatchingConfig:
    """Read a config file (or start from defaults, or from ``base``), apply overrides, validate.

    ``base`` (nested dicts) is applied first, under the file and the overrides: the CLI uses it
    to carry an autoencoder's architecture into fine-tuning.
    """
    return MatchingConfig.load(path, overrides, base=base)


def load_matching_run_config(run_dir: str | os.PathLike[str]) -> MatchingConfig:
    """The config saved as ``config.json`` in a matching run directory.

    Raises:
        CheckpointError: no ``config.json`` or an unreadable one.
    """
    from pathlib import Path

    from landlens.errors import CheckpointError

    p = Path(run_dir)
    path = p if p.suffix == ".json" else p / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{p} is not a matching run directory: config.json not found")
    try:
        raw = json.loads(path.read_text())
        return matching_config_from_dict(raw, str(path))
    except ValueError as exc:
        raise CheckpointError(f"cannot read {path}: {first_line(exc)}") from None
    except LandlensError as exc:
        raise CheckpointError(f"{path}: {first_line(exc)}") from None


__all__ = [
    "AESection",
    "DMLSection",
    "FeaturesSection",
    "MATCH_OPTIMIZERS",
    "MatchDataConfig",
    "MatchOptimConfig",
    "MatchTrainerConfig",
    "MatchingConfig",
    "PairsConfig",
    "apply_matching_overrides",
    "load_matching_config",
    "load_matching_run_config",
    "matching_config_from_dict",
    "merge_config_dicts",
]

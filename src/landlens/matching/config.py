"""Configuration of residual-dyad matching runs (autoencoder pre-training and fine-tuning, discriminator).

Method: N. Khurshid, Mohbat, M. Taj, F. Z. Qureshi, "A Residual-Dyad Encoder Discriminator
Network for Remote Sensing Image Matching". The defaults follow the paper's optimisation:
SGD with an initial learning rate of 0.001, the rate multiplied by 0.2 when the validation
loss stops improving, and early stopping after 10 epochs without improvement.

A :class:`MatchingConfig` is read like a classification config
(:mod:`landlens.training.config`): a YAML or JSON file of sections, then
``section.key=value`` overrides (``optim.lr=0.01``, ``ae.widths=[4,8,8]``, ``out=runs/m``).
Unknown sections or keys and invalid values raise :class:`~landlens.errors.ConfigError`
naming the key. Sections:

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
    matching, ``val_pairs`` fixed validation pairs, ``seed``.
``trainer``
    ``seed`` (weights and data order), ``accelerator``, ``devices``, ``precision``,
    ``log_every_n_steps``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from landlens.errors import ConfigError, LandlensError, first_line
from landlens.matching.networks import KINDS, AEConfig
from landlens.training.config import _choice, _coerce, apply_overrides, read_config_file

MATCH_OPTIMIZERS = ("sgd", "adam")
MATCH_PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed")


@dataclass
class MatchDataConfig:
    """Images and how they are divided and fed (see the module docstring)."""

    path: str = ""
    dataset: str | None = None
    split: str = "80/20"
    seed: int = 0
    input_size: int = 64
    resize_mode: str = "squash"
    batch_size: int = 32
    num_workers: int = 2
    val_fraction: float = 0.1


@dataclass
class AESection:
    """Autoencoder architecture (:class:`~landlens.matching.networks.AEConfig` less the input
    side, which is ``data.input_size``) and the run it starts from."""

    kind: str = "resdyad"
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    latent_channels: int = 512
    init: str | None = None


@dataclass
class DMLSection:
    """Discriminator architecture: ``kind`` (``resdyad`` or ``res``) and ``width``."""

    kind: str = "resdyad"
    width: int = 128


@dataclass
class FeaturesSection:
    """The features a discriminator is trained on: an autoencoder run, or a backbone."""

    ae: str | None = None
    backbone: str | None = None
    weights: str = "auto"
    cache_dir: str = "runs/features"


@dataclass
class MatchOptimConfig:
    """Optimiser, plateau schedule and early stopping (paper: SGD, 0.001, x0.2, 10 epochs)."""

    name: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    plateau_factor: float = 0.2
    plateau_patience: int = 5
    epochs: int = 100
    patience: int | None = 10


@dataclass
class PairsConfig:
    """Pair sampling of discriminator training."""

    per_epoch: int = 10000
    positive_fraction: float = 0.5
    val_pairs: int = 2000
    seed: int = 0


@dataclass
class MatchTrainerConfig:
    """How Lightning runs the loop."""

    seed: int = 0
    accelerator: str = "auto"
    devices: Any = 1
    precision: str = "32-true"
    log_every_n_steps: int = 10


_SECTIONS: dict[str, type] = {"data": MatchDataConfig, "ae": AESection, "dml": DMLSection,
                              "features": FeaturesSection, "optim": MatchOptimConfig, "pairs": PairsConfig,
                              "trainer": MatchTrainerConfig}


@dataclass
class MatchingConfig:
    """One matching run: data, autoencoder, discriminator, features, optimiser, pairs, trainer, output."""

    data: MatchDataConfig = field(default_factory=MatchDataConfig)
    ae: AESection = field(default_factory=AESection)
    dml: DMLSection = field(default_factory=DMLSection)
    features: FeaturesSection = field(default_factory=FeaturesSection)
    optim: MatchOptimConfig = field(default_factory=MatchOptimConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    trainer: MatchTrainerConfig = field(default_factory=MatchTrainerConfig)
    out: str = "runs/matching/run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def ae_config(self) -> AEConfig:
        """The :class:`AEConfig` of the ``ae`` section at ``data.input_size`` (RGB input)."""
        try:
            return AEConfig(kind=self.ae.kind, input_size=self.data.input_size, in_channels=3,
                            widths=tuple(self.ae.widths), latent_channels=self.ae.latent_channels)
        except ConfigError as exc:
            raise ConfigError(f"ae / data.input_size: {first_line(exc)}") from None
        except TypeError as exc:
            raise ConfigError(f"ae: {first_line(exc)}") from None

    def validate(self) -> "MatchingConfig":
        """Check every value that can be checked without touching data or models."""
        d, o, p, t = self.data, self.optim, self.pairs, self.trainer
        _choice("optim.name", o.name, MATCH_OPTIMIZERS)
        _choice("ae.kind", self.ae.kind, KINDS)
        _choice("dml.kind", self.dml.kind, KINDS)
        _choice("data.resize_mode", d.resize_mode, ("crop", "squash"))
        _choice("trainer.precision", str(t.precision), MATCH_PRECISIONS)
        for key, value, low in (("data.batch_size", d.batch_size, 1), ("data.num_workers", d.num_workers, 0),
                                ("data.input_size", d.input_size, 1),
                                ("ae.latent_channels", self.ae.latent_channels, 1), ("dml.width", self.dml.width, 1),
                                ("optim.epochs", o.epochs, 1), ("optim.plateau_patience", o.plateau_patience, 0),
                                ("pairs.per_epoch", p.per_epoch, 2), ("pairs.val_pairs", p.val_pairs, 0),
                                ("trainer.log_every_n_steps", t.log_every_n_steps, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
        if o.patience is not None and (not isinstance(o.patience, int) or isinstance(o.patience, bool)
                                       or o.patience < 1):
            raise ConfigError(f"optim.patience must be a positive integer or null, got {o.patience!r}")
        if not isinstance(self.ae.widths, (list, tuple)) or len(self.ae.widths) != 3:
            raise ConfigError(f"ae.widths must be a list of 3 channel counts, got {self.ae.widths!r}")
        for key, value in (("optim.lr", o.lr),):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{key} must be a positive number, got {value!r}")
        if not 0 <= o.weight_decay:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay!r}")
        if not 0 <= o.momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {o.momentum!r}")
        if not 0 < o.plateau_factor < 1:
            raise ConfigError(f"optim.plateau_factor must be in (0, 1), got {o.plateau_factor!r}")
        if not 0 < p.positive_fraction < 1:
            raise ConfigError(f"pairs.positive_fraction must be in (0, 1), got {p.positive_fraction!r}")
        if not 0 <= d.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction!r}")
        if self.features.ae and self.features.backbone:
            raise ConfigError("features.ae and features.backbone are both set: the discriminator compares one kind "
                              "of features; drop one")
        self.ae_config()
        return self


def matching_config_from_dict(raw: Mapping[str, Any], source: str = "config") -> MatchingConfig:
    """Build a :class:`MatchingConfig` from nested dicts, refusing unknown sections and keys."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    cfg = MatchingConfig()
    for section, values in raw.items():
        if section == "out":
            cfg.out = str(values)
            continue
        if section not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r} (sections: {', '.join([*_SECTIONS, 'out'])})")
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        target = getattr(cfg, section)
        fields = {f.name: f for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"{source}: unknown key {section}.{key} (keys: {', '.join(fields)})")
            setattr(target, key, _coerce(f"{section}.{key}", value, getattr(target, key), str(fields[key].type)))
    if isinstance(cfg.ae.widths, tuple):
        cfg.ae.widths = list(cfg.ae.widths)
    return cfg


def merge_config_dicts(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section (a copy; ``top``'s values win)."""
    out = json.loads(json.dumps(dict(base)))
    for section, values in top.items():
        if isinstance(values, Mapping) and isinstance(out.get(section), dict):
            out[section].update(json.loads(json.dumps(dict(values))))
        else:
            out[section] = json.loads(json.dumps(values))
    return out


def load_matching_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (), *,
                         base: Mapping[str, Any] | None = None) -> MatchingConfig:
    """Read a config file (or start from defaults, or from ``base``), apply overrides, validate.

    ``base`` (nested dicts) is applied first, under the file and the overrides: the CLI uses it
    to carry an autoencoder's architecture into fine-tuning.
    """
    raw = read_config_file(path) if path is not None else {}
    if base:
        raw = merge_config_dicts(base, raw)
    raw = apply_overrides(raw, overrides)
    return matching_config_from_dict(raw, str(path) if path is not None else "config").validate()


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
    "load_matching_config",
    "load_matching_run_config",
    "matching_config_from_dict",
    "merge_config_dicts",
]

"""Matching config: typed keys, overrides read by the key's type, old run directories, the resume check."""

from __future__ import annotations

import json
from typing import get_args

import numpy as np
import pytest

from landlens.errors import CheckpointError, ConfigError
from landlens.matching.config import (AESection, MatchingConfig, apply_matching_overrides, load_matching_config,
                                      load_matching_run_config)

# config.json of a matching run made before the pydantic models (written by the dataclass config)
OLD_RUN_CONFIG = {
    "data": {"path": "/d", "dataset": None, "split": "50/50", "seed": 0, "input_size": 64, "resize_mode": "squash",
             "batch_size": 64, "num_workers": 2, "val_fraction": 0.1},
    "ae": {"kind": "resdyad", "widths": [8, 16, 32], "latent_channels": 512, "init": None},
    "dml": {"kind": "resdyad", "width": 16},
    "features": {"ae": None, "backbone": None, "weights": "auto", "cache_dir": "runs/features"},
    "optim": {"name": "adam", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "plateau_factor": 0.2,
              "plateau_patience": 5, "epochs": 3, "patience": None},
    "pairs": {"per_epoch": 512, "positive_fraction": 0.5, "val_pairs": 200, "seed": 0},
    "trainer": {"seed": 0, "accelerator": "auto", "devices": 1, "precision": "32-true", "log_every_n_steps": 10},
    "out": "runs/matching/run",
}


def _error(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_matching_config(None, overrides)
    assert "\n" not in str(info.value)


def test_a_list_key_is_read_from_a_yaml_list():
    cfg = load_matching_config(None, ["ae.widths=[4,8,16]", "trainer.devices=[0]"])
    assert cfg.ae.widths == [4, 8, 16] and cfg.trainer.devices == [0]
    _error(["ae.widths=[4,8]"], r"ae\.widths=\[4,8\]: expected a list of 3 integers")
    _error(["ae.widths=[4,8,x]"], r"ae\.widths=\[4,8,x\]: expected a list of 3 integers")
    _error(["ae.widths=4"], r"ae\.widths=4: expected a list of 3 integers")


def test_text_and_choice_keys():
    cfg = load_matching_config(None, ["features.backbone=1e5", "features.weights=null", "data.dataset=~"])
    assert cfg.features.backbone == "1e5" and cfg.features.weights == "null" and cfg.data.dataset is None
    _error(["data.split=[1,2]"], r"data\.split=\[1,2\]: expected text, got a list")
    _error(["ae.kind=vgg"], r"ae\.kind=vgg is not one of resdyad, res$")
    _error(["optim.name=adamw"], r"optim\.name=adamw is not one of sgd, adam$")
    _error(["trainer.precision=auto"], r"trainer\.precision=auto is not one of 32, 32-true, 16-mixed, bf16-mixed")
    _error(["ae.depth=3"], r"unknown key ae\.depth \(ae keys: kind, widths, latent_channels, init\)")
    _error(["pairs.per_epoc=10"], r"unknown key pairs\.per_epoc: did you mean pairs\.per_epoch\?")
    _error(["model.backbone=x"], r"unknown section 'model': did you mean features\.backbone\?")


def test_numbers_and_ranges():
    cfg = load_matching_config(None, ["optim.lr=3e-4", "optim.weight_decay=0", "data.val_fraction=0"])
    assert cfg.optim.lr == 0.0003 and cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    _error(["optim.momentum=1"], r"optim\.momentum=1: expected a number in \[0, 1\)")
    _error(["pairs.per_epoch=1"], r"pairs\.per_epoch=1: expected an integer >= 2")
    _error(["optim.patience=0"], r"optim\.patience=0: expected an integer >= 1 or null")
    assert load_matching_config(None, ["optim.patience=null"]).optim.patience is None


def test_kind_choices_are_the_network_kinds():
    from landlens.matching.networks import KINDS

    assert get_args(AESection.model_fields["kind"].annotation) == KINDS


def test_overrides_of_the_matching_keys_apply_to_a_file_dict():
    raw = apply_matching_overrides({"features": {"ae": "/r"}}, ["features.cache_dir=c", "pairs.seed=2"])
    assert raw == {"features": {"ae": "/r", "cache_dir": "c"}, "pairs": {"seed": 2}}
    with pytest.raises(ConfigError, match="unknown section 'model'"):
        apply_matching_overrides({}, ["model.backbone=x"])


def test_base_goes_under_the_file_and_overrides(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("ae: {latent_channels: 16}\n")
    base = {"ae": {"kind": "res", "widths": (8, 16, 32), "latent_channels": 64}, "data": {"input_size": 128}}
    cfg = load_matching_config(f, ["ae.kind=resdyad"], base=base)
    assert (cfg.ae.kind, cfg.ae.widths, cfg.ae.latent_channels, cfg.data.input_size) == ("resdyad", [8, 16, 32], 16,
                                                                                        128)


def test_old_run_config_loads_and_round_trips(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(OLD_RUN_CONFIG))
    cfg = load_matching_run_config(run)
    # keys added since take the value that trains as the old run did
    assert cfg.to_dict() == {**OLD_RUN_CONFIG, "pairs": {**OLD_RUN_CONFIG["pairs"], "augment": "none"}}
    assert list(cfg.to_dict()) == list(OLD_RUN_CONFIG)
    (run / "config.json").write_text(json.dumps({**OLD_RUN_CONFIG, "pairs": {"per_epoch": "many"}}))
    with pytest.raises(CheckpointError, match=r"config\.json: pairs\.per_epoch='many': expected an integer >= 2"):
        load_matching_run_config(run)


def test_resume_of_an_old_finished_run_compares_the_configs(tmp_path):
    """A run directory written before the change: the same config resumes (finished: returned as is), a changed
    key is named."""
    from landlens.matching.train import train_dml

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "config.json").write_text(json.dumps({**OLD_RUN_CONFIG, "out": str(run)}))
    (run / "results.json").write_text(json.dumps({"step": "train-dml", "marker": 1}))
    cfg = load_matching_config(run / "config.json")
    assert isinstance(cfg, MatchingConfig)
    res = train_dml(cfg, None, resume=True, progress=False)
    assert res.status == "complete" and res.results["marker"] == 1
    changed = load_matching_config(run / "config.json", ["optim.lr=0.02", "ae.widths=[8,16,64]"])
    with pytest.raises(ConfigError, match=r"ae\.widths, optim\.lr changed$"):
        train_dml(changed, None, resume=True, progress=False)
    assert np.isfinite(cfg.optim.lr)

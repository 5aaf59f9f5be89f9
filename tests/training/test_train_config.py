"""Training config: defaults, file reading, overrides, and one-line errors for bad keys and values."""

from __future__ import annotations

import json

import pytest

from landlens.errors import ConfigError
from landlens.training.config import apply_overrides, config_from_dict, load_config, parse_override
from landlens.training.grid import grid_configs, parse_grid


def test_yaml_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  path: /x\n  split: 70/20/10\nmodel:\n  strategy: full\noptim:\n  lr: 0.01\n")
    cfg = load_config(f, ["optim.lr=3e-4", "trainer.patience=2", "data.input_size=64", "out=runs/a"])
    assert cfg.data.split == "70/20/10"
    assert cfg.model.strategy == "full"
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert isinstance(cfg.optim.lr, float)
    assert cfg.trainer.patience == 2
    assert cfg.data.input_size == 64
    assert cfg.out == "runs/a"


def test_json_file_round_trip(tmp_path):
    cfg = load_config(None, ["data.path=/d", "loss.name=ice", "model.head=se"])
    f = tmp_path / "c.json"
    f.write_text(json.dumps(cfg.to_dict()))
    again = load_config(f)
    assert again.to_dict() == cfg.to_dict()


def test_integer_lr_becomes_float_and_null_patience():
    cfg = load_config(None, ["data.path=/d", "optim.lr=1", "trainer.patience=null"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.trainer.patience is None


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("optimizer.lr=0.1", "optimizer"),
    ("model.strategy=half", "model.strategy"),
    ("optim.name=rmsprop", "optim.name"),
    ("data.augment=mixup", "data.augment"),
    ("trainer.epochs=0", "trainer.epochs"),
    ("optim.lr=-1", "optim.lr"),
    ("data.batch_size=abc", "data.batch_size"),
    ("trainer.deterministic=maybe", "trainer.deterministic"),
    ("loss.name=focal", "loss.name"),
    ("lr", "section.key=value"),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")) as info:
        load_config(None, ["data.path=/d", override])
    assert "\n" not in str(info.value)


def test_missing_data_path_is_explained():
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, [])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_colour_alias():
    assert load_config(None, ["data.path=/d", "data.augment=color"]).data.augment == "colour"


def test_parse_override_yaml_values():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=1e-3") == ("a.b", 0.001)
    assert apply_overrides({"data": {"path": "x"}}, ["data.seed=3"]) == {"data": {"path": "x", "seed": 3}}


def test_grid_is_a_cartesian_product(tmp_path):
    grid = parse_grid(["optim.lr=0.03,0.003", "trainer.epochs=5,10", "data.batch_size=64,256"])
    assert grid == {"optim.lr": [0.03, 0.003], "trainer.epochs": [5, 10], "data.batch_size": [64, 256]}
    runs = grid_configs({"data": {"path": "/d"}}, grid, tmp_path)
    assert len(runs) == 8
    seen = {(c.optim.lr, c.trainer.epochs, c.data.batch_size) for _, c in runs}
    assert seen == {(a, b, c) for a in (0.03, 0.003) for b in (5, 10) for c in (64, 256)}
    assert len({c.out for _, c in runs}) == 8


def test_grid_errors():
    with pytest.raises(ConfigError, match="at least one"):
        parse_grid([])
    with pytest.raises(ConfigError, match="twice"):
        parse_grid(["optim.lr=1", "optim.lr=2"])
    with pytest.raises(ConfigError, match="optim.foo"):
        grid_configs({"data": {"path": "/d"}}, parse_grid(["optim.foo=1,2"]), "/tmp/x")


def test_config_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError):
        config_from_dict({"data": 3})

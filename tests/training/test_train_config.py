"""Training config: defaults, file reading, overrides, and one-line errors for bad keys and values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from landlens.errors import ConfigError
from landlens.training.config import (apply_overrides, config_from_dict, load_config, parse_override,
                                      read_config_file)
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


def test_parse_override_reads_the_value_by_the_key_type():
    # was: any key's text read as YAML (made-up keys a.b); now the key must exist and its type reads the text
    assert parse_override("trainer.devices=[1, 2]") == ("trainer.devices", [1, 2])
    assert parse_override("data.verify=true") == ("data.verify", True)
    assert parse_override("optim.lr=1e-3") == ("optim.lr", 0.001)
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


# ----------------------------------------------------------------------------- typed keys (pydantic models)

def _one_line_error(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, ["data.path=/d", *overrides])
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_list_for_a_text_key_is_refused_on_one_line(tmp_path):
    msg = _one_line_error(["data.split=[1,2]"], r"data\.split")
    assert "[1,2]" in msg and "expected text" in msg and "list" in msg
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  path: /d\n  split: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: data\.split=\[1, 2\]: expected text"):
        load_config(f)


def test_a_text_key_keeps_the_override_text_verbatim(tmp_path):
    cfg = load_config(None, ["data.path=/d", "model.backbone=1e5", "model.weights=007", "data.split=80/20"])
    assert cfg.model.backbone == "1e5" and cfg.model.weights == "007" and cfg.data.split == "80/20"
    assert load_config(None, ["data.path=/d", "data.dataset=null"]).data.dataset is None  # optional text: null
    f = tmp_path / "c.yaml"
    f.write_text("data: {path: /d}\nmodel: {backbone: 1e5}\n")  # YAML 1.1 (PyYAML) reads 1e5 as text
    assert load_config(f).model.backbone == "1e5"
    f.write_text("data: {path: /d}\nmodel: {backbone: 100000}\n")  # a number where text is due: refused
    with pytest.raises(ConfigError, match=r"model\.backbone=100000: expected text \(write it in quotes"):
        load_config(f)


def test_a_bool_key_refuses_other_words():
    msg = _one_line_error(["data.verify=maybe"], r"data\.verify=maybe: expected true or false")
    assert msg.count(":") == 1
    _one_line_error(["trainer.deterministic=1"], r"trainer\.deterministic=1: expected true or false")
    assert load_config(None, ["data.path=/d", "data.verify=false"]).data.verify is False


def test_unknown_keys_are_named_with_the_closest_valid_key():
    _one_line_error(["optim.lrr=0.1"], r"unknown key optim\.lrr: did you mean optim\.lr\?")
    _one_line_error(["trainer.lr=0.1"], r"unknown key trainer\.lr: did you mean optim\.lr\?")  # another section's
    _one_line_error(["optimizer.lr=0.1"], r"unknown section 'optimizer': did you mean 'optim'\?")
    _one_line_error(["lr=0.1"], r"unknown section 'lr': did you mean optim\.lr\?")
    _one_line_error(["data.zzz=1"], r"unknown key data\.zzz \(data keys: path, dataset, split")
    with pytest.raises(ConfigError, match=r"f\.json: unknown key data\.pth: did you mean data\.path\?"):
        config_from_dict({"data": {"pth": "/d"}}, "f.json")


def test_numbers_are_read_as_numbers(tmp_path):
    cfg = load_config(None, ["data.path=/d", "optim.lr=3e-4", "optim.weight_decay=5E-5", "trainer.epochs=1e1",
                             "loss.margin=-0.5", "trainer.limit_train_batches=1"])
    assert cfg.optim.lr == 0.0003 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 5e-5 and cfg.loss.margin == -0.5
    assert cfg.trainer.epochs == 10 and isinstance(cfg.trainer.epochs, int)
    assert cfg.trainer.limit_train_batches == 1.0 and isinstance(cfg.trainer.limit_train_batches, float)
    f = tmp_path / "c.yaml"
    f.write_text("data: {path: /d}\noptim: {lr: 1e-3, weight_decay: 0}\ntrainer: {epochs: 4.0}\n")
    cfg = load_config(f)  # PyYAML reads 1e-3 as text: a number key still takes it
    assert cfg.optim.lr == 0.001 and cfg.optim.weight_decay == 0.0 and cfg.trainer.epochs == 4
    _one_line_error(["optim.lr=fast"], r"optim\.lr=fast: expected a number > 0")
    _one_line_error(["trainer.epochs=2.5"], r"trainer\.epochs=2\.5: expected an integer >= 1")
    _one_line_error(["optim.gamma=2"], r"optim\.gamma=2: expected a number in \(0, 1\]")
    _one_line_error(["data.batch_size=true"], r"data\.batch_size=true: expected an integer >= 1")


def test_a_list_key_is_read_from_a_yaml_list():
    assert load_config(None, ["data.path=/d", "trainer.devices=[1,2]"]).trainer.devices == [1, 2]
    assert load_config(None, ["data.path=/d", "trainer.devices=2"]).trainer.devices == 2
    assert load_config(None, ["data.path=/d", "trainer.devices=auto"]).trainer.devices == "auto"
    _one_line_error(["trainer.devices=[a, 1.5]"], r"trainer\.devices=\[a, 1\.5\]: expected an integer, a list of")


def test_choices_are_named_in_errors():
    _one_line_error(["optim.schedule=linear"], r"optim\.schedule=linear is not one of none, step, cosine, plateau$")
    _one_line_error(["data.resize_mode=fit"], r"data\.resize_mode=fit is not one of crop, squash or null")
    _one_line_error(["trainer.precision=64"], r"trainer\.precision=64 is not one of auto, 32, 32-true")
    assert load_config(None, ["data.path=/d", "trainer.precision=32"]).trainer.precision == "32"
    assert config_from_dict({"trainer": {"precision": 32}}).trainer.precision == "32"  # a file's bare 32


def test_choice_lists_are_the_library_lists():
    from landlens.cli.train import train
    from landlens.training.augment import AUGMENT_PRESETS
    from landlens.models.heads import HEAD_KINDS
    from landlens.training.config import AUGMENTS, HEADS

    assert HEADS == HEAD_KINDS and AUGMENTS == AUGMENT_PRESETS
    opts = {o.name: o for o in train.commands["run"].params}
    assert tuple(opts["head"].type.choices) == HEADS


def test_assignments_are_checked_on_one_line():
    cfg = load_config(None, ["data.path=/d"])
    cfg.data.num_workers = 0
    with pytest.raises(ConfigError, match=r"^data\.num_workers=-1: expected an integer >= 0$"):
        cfg.data.num_workers = -1
    with pytest.raises(ConfigError, match=r"^model\.strategy='half' is not one of linear, partial, full$"):
        cfg.model.strategy = "half"


def test_grid_values_are_read_by_the_key_type(tmp_path):
    grid = parse_grid(["model.backbone=resnet18,1e5", "optim.lr=1e-3,3e-4"])
    assert grid == {"model.backbone": ["resnet18", "1e5"], "optim.lr": [0.001, 0.0003]}
    runs = grid_configs({"data": {"path": "/d"}}, grid, tmp_path)
    assert {c.model.backbone for _, c in runs} == {"resnet18", "1e5"}
    with pytest.raises(ConfigError, match=r"data\.verify=maybe: expected true or false"):
        parse_grid(["data.verify=true,maybe"])


BENCHMARK_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", BENCHMARK_CONFIGS, ids=lambda p: p.name)
def test_benchmark_configs_load(path):
    raw = read_config_file(path)
    cfg = load_config(path)
    assert cfg.out == raw["out"] and cfg.model.backbone == raw["model"]["backbone"]
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()


def test_benchmark_configs_are_there():
    assert len(BENCHMARK_CONFIGS) >= 5


# config.json of a run made before the pydantic models (written by the dataclass config, including
# the old bug's "100000.0" for --set model.backbone=1e5)
OLD_RUN_CONFIG = {
    "data": {"path": "/d", "dataset": None, "split": "80/20", "seed": 0, "input_size": None, "resize_mode": None,
             "augment": "colour", "batch_size": 32, "eval_batch_size": 64, "num_workers": 2, "verify": True,
             "cache_features": "auto", "samples_per_class": None},
    "model": {"backbone": "100000.0", "weights": "auto", "strategy": "full", "unfreeze_stages": 1, "head": "linear",
              "dropout": 0.0, "hidden": 512, "reduction": 16, "embedding_dim": None, "embedding_bn": False},
    "loss": {"name": "ce", "smoothing": 0.1, "eps": 1e-07, "ice_weight": 1.0, "margin": None, "scale": None,
             "mining": "semihard", "proxy_lr_mult": 100.0},
    "optim": {"name": "adamw", "lr": 0.0003, "momentum": 0.9, "weight_decay": 0.0001, "backbone_lr_mult": 1.0,
              "schedule": "cosine", "step_size": 5, "gamma": 0.1, "plateau_patience": 2, "warmup_epochs": 0},
    "trainer": {"epochs": 10, "patience": 3, "monitor": "val_loss", "precision": "32", "accelerator": "auto",
                "devices": "auto", "num_nodes": 1, "strategy": "auto", "seed": 0, "deterministic": False,
                "checkpoint_every_n_steps": None, "limit_train_batches": 1.0, "log_every_n_steps": 10,
                "bootstrap": 1000},
    "out": "runs/train/run",
}


def test_old_run_config_loads_and_round_trips(tmp_path):
    from landlens.training.engine import load_run_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(OLD_RUN_CONFIG))
    cfg = load_run_config(run)
    assert cfg.model.backbone == "100000.0" and cfg.optim.lr == 0.0003 and cfg.trainer.precision == "32"
    d = cfg.to_dict()
    assert d == OLD_RUN_CONFIG
    assert [list(v) if isinstance(v, dict) else k for k, v in d.items()] == \
        [list(v) if isinstance(v, dict) else k for k, v in OLD_RUN_CONFIG.items()]  # same keys, same order
    older = json.loads(json.dumps(OLD_RUN_CONFIG))
    del older["data"]["cache_features"], older["loss"]["proxy_lr_mult"]  # keys a still older run lacks
    assert load_run_config(_write(tmp_path / "older", older)).to_dict() == OLD_RUN_CONFIG


def _write(run, raw):
    run.mkdir()
    (run / "config.json").write_text(json.dumps(raw))
    return run


def test_resume_compares_with_an_old_run_config(tmp_path):
    from landlens.training.engine import train

    run = _write(tmp_path / "run", {**OLD_RUN_CONFIG, "out": str(tmp_path / "run")})
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    cfg = load_config(run / "config.json", ["optim.lr=0.01", "trainer.epochs=3"])
    with pytest.raises(ConfigError, match=r"cannot resume .* optim\.lr, trainer\.epochs changed$"):
        train(cfg, resume=True, progress=False)

"""End-to-end training runs on generated folders: artefacts, exact resume, frozen parts, errors."""

from __future__ import annotations

import csv
import json

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fixtures.make_datasets import make_folder_dataset
from landlens.errors import ConfigError, DatasetError
from landlens.models.classifier import load_classifier
from landlens.models.preprocessing import preprocess_images
from landlens.training.config import load_config
from landlens.training.engine import train

CLASSES = ["beach", "forest", "river"]


@pytest.fixture
def folder(tmp_path):
    return make_folder_dataset(tmp_path / "scenes", CLASSES, per_class=10, size=40)


def _cfg(folder, out, *extra):
    return load_config(None, [f"data.path={folder}", f"out={out}", "data.num_workers=0", "data.batch_size=8",
                              "data.eval_batch_size=16", "trainer.bootstrap=200", *extra])


def _image_cfg(folder, out, *extra):
    """A small random-init network on 32-pixel inputs: fast on CPU, runs the image path."""
    return _cfg(folder, out, "model.backbone=resnet18", "model.weights=none", "data.input_size=32",
                "optim.lr=0.01", *extra)


@pytest.mark.weights("ndf")
def test_linear_run_on_cached_features(folder, tmp_path):
    cfg = _cfg(folder, tmp_path / "run", "model.backbone=tv_squeezenet1_1", "model.weights=package",
               "data.input_size=64", "trainer.epochs=15", "optim.lr=0.01", "data.split=70/10/20")
    res = train(cfg, progress=False, cache_dir=tmp_path / "cache")
    run = res.run_dir
    assert res.status == "complete" and res.results["feature_cache"] is True
    for name in ("config.json", "split.json", "history.csv", "history.json", "model.json", "model.safetensors",
                 "results.json", "test_predictions.csv", "confusion_matrix.png", "learning_curves.png",
                 "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (run / name).is_file(), name
    assert len(json.loads((run / "history.json").read_text())) == 15
    # the reported accuracy is the accuracy of the predictions file, which the saved model reproduces
    rows = list(csv.DictReader((run / "test_predictions.csv").open()))
    assert len(rows) == res.results["data"]["parts"]["test"] == 6
    acc = np.mean([r["true"] == r["predicted"] for r in rows])
    assert res.accuracy == pytest.approx(acc)
    model = load_classifier(run)
    from landlens.data.io import load_rgb

    imgs = [load_rgb(folder / r["path"]) for r in rows]
    with torch.inference_mode():
        probs = model(preprocess_images(imgs, model.preprocessing)).exp()
    assert [CLASSES[i] for i in probs.argmax(1).tolist()] == [r["predicted"] for r in rows]
    np.testing.assert_allclose(probs.max(1).values.numpy(), [float(r["probability"]) for r in rows], atol=1e-4)
    # pretrained features separate these colour-coded classes
    assert res.accuracy == 1.0


class _StopAfter(L.Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_start(self, trainer, pl_module):  # as a Ctrl+C early in the next epoch
        if trainer.current_epoch == self.epochs:
            raise KeyboardInterrupt


def test_resume_ends_with_the_same_weights(folder, tmp_path):
    # a validation part: last.ckpt must follow every epoch, not only those that improve val_loss
    extra = ("trainer.epochs=4", "model.strategy=full", "model.head=mlp", "model.dropout=0.3",
             "data.augment=dihedral", "optim.name=sgd", "optim.schedule=step", "optim.step_size=2",
             "data.split=70/10/20", "optim.lr=0.2")
    train(_image_cfg(folder, tmp_path / "full", *extra), progress=False)
    cfg = _image_cfg(folder, tmp_path / "cut", *extra)
    cut = train(cfg, progress=False, callbacks=[_StopAfter(2)])
    assert cut.status == "interrupted"
    ckpt = torch.load(tmp_path / "cut/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 * 2  # 21 train images / batch 8 = 2 full batches
    resumed = train(cfg, resume=True, progress=False)
    assert resumed.status == "complete"
    a = load_file(str(tmp_path / "full/model.safetensors"))
    b = load_file(str(tmp_path / "cut/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    hist = json.loads((tmp_path / "cut/history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]


def test_linear_strategy_with_augmentation_keeps_the_backbone(folder, tmp_path):
    cfg = _image_cfg(folder, tmp_path / "lin", "trainer.epochs=2", "model.strategy=linear", "data.augment=crop-flip")
    torch.manual_seed(0)
    res = train(cfg, progress=False)
    assert res.results["feature_cache"] is False
    trained = load_file(str(tmp_path / "lin/model.safetensors"))
    from landlens.training.engine import build_model

    L.seed_everything(0, verbose=False)
    start = build_model(cfg, CLASSES).state_dict()
    for k, v in trained.items():
        if k.startswith("backbone."):
            torch.testing.assert_close(v, start[k], rtol=0, atol=0, msg=k)
    assert res.results["strategy"]["trainable_params"] < res.results["strategy"]["frozen_params"]


def test_existing_run_directory_is_not_overwritten(folder, tmp_path):
    cfg = _image_cfg(folder, tmp_path / "r", "trainer.epochs=1")
    train(cfg, progress=False)
    before = (tmp_path / "r/model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_image_cfg(folder, tmp_path / "r", "trainer.epochs=1"), progress=False)
    assert (tmp_path / "r/model.safetensors").read_bytes() == before
    with pytest.raises(ConfigError, match="optim.lr"):
        train(_image_cfg(folder, tmp_path / "r", "trainer.epochs=1", "optim.lr=0.5"), resume=True, progress=False)


def test_unreadable_image_is_named_before_training(folder, tmp_path):
    bad = folder / "forest" / "forest_3.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match="forest_3.jpg"):
        train(_image_cfg(folder, tmp_path / "r", "trainer.epochs=1"), progress=False)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_unreadable_image_in_a_loader_worker_is_one_line(folder, tmp_path):
    (folder / "forest" / "forest_3.jpg").write_bytes(b"not a jpeg at all")
    cfg = _image_cfg(folder, tmp_path / "r", "trainer.epochs=1", "data.verify=false", "data.num_workers=1",
                     "data.split=50/50")
    with pytest.raises(DatasetError) as info:
        train(cfg, progress=False)
    assert "forest_3.jpg" in str(info.value) and "\n" not in str(info.value)

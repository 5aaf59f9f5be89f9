"""ClassificationTask and SceneDataModule.from_folder in a user's own Lightning Trainer (no landlens engine)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from fixtures.make_datasets import make_folder_dataset
from landlens.errors import ConfigError

CLASSES = ["beach", "forest", "river"]


class _EpochLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.losses.append(float(trainer.callback_metrics["train_loss"]))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("task") / "scenes", CLASSES, per_class=10, size=40)


def test_user_code_trains_in_its_own_trainer(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Lightning's default logger and checkpoints go to the working directory
    torch.manual_seed(0)
    # what the README shows, with a random-init backbone small enough for CPU tests
    from landlens.training import ClassificationTask, SceneDataModule

    task = ClassificationTask(backbone="resnet18", weights="none", num_classes=3, strategy="full", input_size=32,
                              lr=0.01)
    dm = SceneDataModule.from_folder(folder, split="80/20", preprocessing=task.preprocessing, batch_size=8,
                                     num_workers=0)
    losses = _EpochLosses()
    trainer = L.Trainer(max_epochs=6, limit_train_batches=2, callbacks=[losses], enable_progress_bar=False)
    trainer.fit(task, dm)

    assert dm.classes == CLASSES and dm.num_classes == 3
    assert {"train_loss", "train_acc"} <= set(trainer.callback_metrics)
    assert len(losses.losses) == 6 and losses.losses[-1] < losses.losses[0]
    assert trainer.global_step == 6 * 2  # limit_train_batches was honoured
    tested = trainer.test(task, dm, verbose=False)
    assert set(tested[0]) == {"test_loss", "test_acc"}
    probs = torch.cat(trainer.predict(task, dm))
    assert probs.shape == (6, 3)  # 20% of 30 images
    torch.testing.assert_close(probs.sum(1), torch.ones(6))
    # the trained classifier is task.model, the network `landlens predict` reads once saved
    assert task.model.classes == ["0", "1", "2"] and task.net is task.model
    from landlens.models.classifier import load_classifier, save_classifier

    save_classifier(task.model, tmp_path / "model")
    x, _ = next(iter(dm.predict_dataloader()))
    with torch.inference_mode():
        torch.testing.assert_close(load_classifier(tmp_path / "model")(x).exp(), task.model.eval()(x).exp())


def test_checkpoint_of_a_users_trainer_rebuilds_the_task(folder, tmp_path):
    from landlens.training.datamodule import SceneDataModule
    from landlens.training.task import ClassificationTask

    torch.manual_seed(0)
    task = ClassificationTask("resnet18", "none", classes=CLASSES, strategy="partial", head="mlp", input_size=32,
                              optimizer="sgd", schedule="step", step_size=1)
    dm = SceneDataModule.from_folder(folder, "70/10/20", backbone="resnet18", batch_size=8, num_workers=0)
    trainer = L.Trainer(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    trainer.fit(task, dm)
    assert {"val_loss", "val_acc"} <= set(trainer.callback_metrics)
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    again = ClassificationTask.load_from_checkpoint(ckpt, weights_only=True)
    assert again.classes == CLASSES and again.hparams.head == "mlp"
    for k, v in task.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0, msg=k)
    frozen = [n for n, p in again.model.backbone.named_parameters() if not p.requires_grad]
    assert frozen  # the partial strategy is applied again on rebuilding


def test_simple_arguments_are_checked():
    from landlens.training.task import ClassificationTask

    with pytest.raises(ConfigError, match="num_classes"):
        ClassificationTask("resnet18", "none")
    with pytest.raises(ConfigError, match="num_classes=4"):
        ClassificationTask("resnet18", "none", num_classes=4, classes=CLASSES)
    with pytest.raises(ConfigError, match="optimizer"):
        ClassificationTask("resnet18", "none", num_classes=3, optimizer="lbfgs")
    with pytest.raises(ConfigError, match="strategy"):
        ClassificationTask("resnet18", "none", num_classes=3, strategy="most")
    with pytest.raises(ConfigError, match="loss"):
        ClassificationTask("resnet18", "none", num_classes=3, loss="proxy_anchor")
    with pytest.raises(ConfigError, match="frozen backbone"):
        ClassificationTask("resnet18", "none", num_classes=3, strategy="full").use_cached_features()
    task = ClassificationTask("resnet18", "none", num_classes=3).use_cached_features()
    assert task.net is task.model.head
    assert all(k.startswith("net.") for k in task.state_dict())  # checkpoints hold the head only
    assert not any(k.startswith("net.backbone") for k in task.state_dict())


def test_from_folder_needs_the_networks_preprocessing(folder):
    from landlens.training.datamodule import SceneDataModule

    with pytest.raises(ConfigError, match="preprocessing"):
        SceneDataModule.from_folder(folder)

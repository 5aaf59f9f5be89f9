"""Metric-learning runs on the training engine: losses, miners, balanced batches, runs that learn, resume."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import average_precision_score

from landlens.errors import ConfigError
from landlens.models.classifier import EmbeddingHead, load_embedder
from landlens.models.registry import create_backbone
from landlens.training.config import METRIC_LOSSES, OptimConfig, load_config
from landlens.training.datamodule import ClassBalancedSampler
from landlens.training.engine import train
from landlens.training.metric import MetricTask, build_metric_loss


def make_channel_scenes(root: Path, classes: int = 4, per_class: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Class = the texture scale of the red channel; green and blue hold textures drawn regardless
    of the class. Colour-blind texture descriptors (LBP-RGB) see the class in a third of their
    dimensions only, so cosine retrieval on them is poor until a projection learns to drop the
    nuisance channels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    scales = [2, 5, 10, 20]

    def stripes(cycles: float) -> np.ndarray:
        ang = rng.uniform(0, np.pi)
        u = (xx * np.cos(ang) + yy * np.sin(ang)) / size
        return 0.5 + 0.5 * np.sin(2 * np.pi * cycles * u + rng.uniform(0, 2 * np.pi))

    for c in range(classes):
        for k in range(per_class):
            rgb = np.stack([stripes(scales[c]), stripes(rng.choice(scales)), stripes(rng.choice(scales))], -1)
            img = rgb * 200 + 25 + rng.normal(0, 4, (size, size, 3))
            p = root / f"scale{c}" / f"scale{c}_{k}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
    return root


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return make_channel_scenes(tmp_path_factory.mktemp("metric") / "scenes")


def _cfg(folder: Path, out: Path, *extra: str):
    return load_config(None, [f"data.path={folder}", f"out={out}", "data.num_workers=0", "data.split=50/25/25",
                              "data.batch_size=16", "data.eval_batch_size=32", "model.backbone=lbp_rgb",
                              "data.input_size=64", "model.embedding_dim=16", "trainer.monitor=val_map",
                              "optim.lr=0.01", *extra])


# --------------------------------------------------------------------------- losses and miners


def _batch(seed: int = 0, n_per_class: int = 4, classes: int = 3, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), 12, generator=g) + 0.8 * torch.nn.functional.one_hot(y, 12).float()
    return x, y


@pytest.mark.parametrize("name", METRIC_LOSSES)
def test_each_loss_builds_and_learns_a_separating_projection(name):
    torch.manual_seed(0)
    x, y = _batch()
    head = EmbeddingHead(12, 8)
    loss = build_metric_loss(name, 3, 8)
    groups = [{"params": list(head.parameters()), "lr": 0.05}] + loss.param_groups(0.05, 10.0)
    assert bool(loss.param_groups(0.05, 10.0)) == (name in ("proxy_anchor", "arcface"))
    opt = torch.optim.Adam(groups)
    proxies = [p.detach().clone() for p in loss.parameters()]
    first = float(loss(head(x), y))
    assert np.isfinite(first) and first > 0
    for _ in range(60):
        opt.zero_grad()
        value = loss(head(x), y)
        value.backward()
        opt.step()
    assert float(loss(head(x), y)) < 0.5 * first
    for before, after in zip(proxies, loss.parameters()):  # the proxies train too
        assert not torch.equal(before, after.detach())
    # the trained projection ranks same-class items first: nearest neighbour of each item is its class
    with torch.no_grad():
        e = head(x)
    sim = e @ e.T - 2 * torch.eye(len(y))
    assert (y[sim.argmax(1)] == y).float().mean() >= 0.9


def _brute_triplet(e: torch.Tensor, y: torch.Tensor, margin: float, kind: str) -> float:
    """Triplet margin loss over the mined triplets, averaged over the triplets with a non-zero loss."""
    d = torch.cdist(e, e).double()
    losses = []
    for a in range(len(y)):
        for p in range(len(y)):
            for n in range(len(y)):
                if a == p or y[a] != y[p] or y[a] == y[n]:
                    continue
                gap = float(d[a, n] - d[a, p])
                chosen = {"all": gap <= margin, "hard": gap <= 0, "semihard": 0 < gap <= margin}[kind]
                if chosen:
                    losses.append(max(0.0, margin - gap))
    nonzero = [v for v in losses if v > 0]
    return float(np.mean(nonzero)) if nonzero else 0.0


@pytest.mark.parametrize("kind", ["all", "hard", "semihard"])
def test_triplet_loss_with_its_miner_matches_a_direct_computation(kind):
    x, y = _batch(seed=3, n_per_class=3)
    e = torch.nn.functional.normalize(x[:, :6], dim=1)
    loss = build_metric_loss("triplet", 3, 6, margin=0.3, mining=kind)
    assert loss.describe()["miner"] == "TripletMarginMiner"
    assert float(loss(e, y)) == pytest.approx(_brute_triplet(e, y, 0.3, kind), rel=1e-5, abs=1e-6)
    assert build_metric_loss("triplet", 3, 6, mining="none").miner is None


def test_proxy_parameters_get_their_own_learning_rate():
    head = EmbeddingHead(12, 8)
    loss = build_metric_loss("proxy_anchor", 3, 8)
    optim = OptimConfig(name="adamw", lr=0.002, schedule="none")
    from landlens.training.task import head_param_groups

    groups = head_param_groups(head, optim.lr, optim.weight_decay) + loss.param_groups(optim.lr, 100.0)
    opt = MetricTask(head, loss, optim, 3, param_groups=groups).configure_optimizers()
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["loss_proxies"]["lr"] == pytest.approx(0.2) and by_name["loss_proxies"]["weight_decay"] == 0
    assert by_name["loss_proxies"]["params"][0] is loss.loss.proxies
    assert by_name["head"]["lr"] == pytest.approx(0.002)


def test_class_balanced_batches_are_seeded_by_epoch():
    labels = np.repeat(np.arange(5), [7, 3, 9, 4, 6])
    s = ClassBalancedSampler(labels, 3, 9, seed=4)
    order = list(s)
    assert len(order) == len(s) == 27  # a whole number of batches, about one pass
    for b in range(0, len(order), 9):
        counts = np.bincount(labels[order[b:b + 9]], minlength=5)
        assert sorted(counts.tolist()) == [0, 0, 3, 3, 3]
    assert list(s) == order  # same (seed, epoch): same batches
    s.set_epoch(1)
    assert list(s) != order
    s.set_epoch(0)
    assert list(s) == order
    with pytest.raises(ConfigError, match="multiple of data.samples_per_class=4"):
        ClassBalancedSampler(labels, 4, 9, seed=0)
    with pytest.raises(ConfigError, match="batch size <= 15"):
        ClassBalancedSampler(labels, 3, 18, seed=0)


def test_config_keys_are_validated(tmp_path):
    base = [f"data.path={tmp_path}", "trainer.monitor=val_map"]
    with pytest.raises(ConfigError, match="set model.embedding_dim"):
        load_config(None, [f"data.path={tmp_path}", "loss.name=proxy_anchor"])
    with pytest.raises(ConfigError, match="classification loss"):
        load_config(None, [*base, "model.embedding_dim=64"])
    with pytest.raises(ConfigError, match="trainer.monitor='val_loss' does not apply"):
        load_config(None, [f"data.path={tmp_path}", "model.embedding_dim=64", "loss.name=triplet"])
    with pytest.raises(ConfigError, match="val_map"):
        load_config(None, [*base])
    with pytest.raises(ConfigError, match="data.samples_per_class"):
        load_config(None, [*base, "model.embedding_dim=64", "loss.name=triplet", "data.samples_per_class=1"])
    with pytest.raises(ConfigError, match="multiple of data.samples_per_class=4"):
        load_config(None, [*base, "model.embedding_dim=64", "loss.name=triplet", "data.batch_size=30"])
    with pytest.raises(ConfigError, match="loss.mining"):
        load_config(None, [*base, "model.embedding_dim=64", "loss.name=triplet", "loss.mining=hardest"])
    with pytest.raises(ConfigError, match="model.embedding_dim"):
        load_config(None, [*base, "model.embedding_dim=1", "loss.name=triplet"])
    assert load_config(None, [*base, "model.embedding_dim=64", "loss.name=triplet"]).samples_per_class() == 4
    assert load_config(None, [*base, "model.embedding_dim=64", "loss.name=arcface"]).samples_per_class() == 0
    assert load_config(None, [f"data.path={tmp_path}"]).samples_per_class() == 0  # classification: untouched


# --------------------------------------------------------------------------- whole runs


def _split_map(emb: np.ndarray, labels: np.ndarray, paths: list[str], test_paths: set[str]) -> float:
    """mAP of the split protocol by scikit-learn: each test image queries all other images (cosine)."""
    aps = []
    for i, p in enumerate(paths):
        if p not in test_paths:
            continue
        keep = np.arange(len(paths)) != i
        sims = emb[keep] @ emb[i]
        aps.append(average_precision_score(labels[keep] == labels[i], sims))
    return float(np.mean(aps))


def test_cached_feature_run_learns_to_retrieve(scenes, tmp_path):
    res = train(_cfg(scenes, tmp_path / "run", "loss.name=triplet", "trainer.epochs=25"), progress=False,
                cache_dir=tmp_path / "cache")
    r = res.results
    assert res.status == "complete" and r["feature_cache"] is True and r["task"] == "metric"
    assert r["loss"]["miner"] == "TripletMarginMiner" and r["samples_per_class"] == 4
    start, val, test = r["start"]["embedding"], r["val"]["metrics"]["mAP"], r["test"]["metrics"]["mAP"]
    # the colour-blind texture histogram retrieves poorly; the learned projection far better
    assert r["start"]["backbone"]["test"]["mAP"] < 0.55 and start["test"]["mAP"] < 0.55
    assert val > start["val"]["mAP"] + 0.3
    assert test > start["test"]["mAP"] + 0.3
    assert r["test"]["protocol"]["name"] == "split" and r["test"]["protocol"]["database"] == "archive-minus-query"
    assert r["test"]["protocol"]["n_queries"] == 16 and r["test"]["protocol"]["n_database_per_query"] == 63
    # the reported val mAP is the best epoch's, the one the checkpoint kept
    hist = json.loads((res.run_dir / "history.json").read_text())
    assert val == pytest.approx(max(h["val_map"] for h in hist), abs=1e-6)
    assert r["best_epoch"] == 1 + int(np.argmax([h["val_map"] for h in hist]))
    # the saved run is a backbone: unit-length embeddings that reproduce the reported test mAP
    bb = create_backbone(f"run:{res.run_dir}")
    assert bb.num_features == 16 and bb.weights.source == "run"
    from landlens.data.folder import scan_folder
    from landlens.data.io import load_rgb
    from landlens.models.preprocessing import preprocess_images

    ds = scan_folder(scenes)
    with torch.inference_mode():
        emb = bb(preprocess_images([load_rgb(ds.absolute_path(i)) for i in range(len(ds.paths))],
                                   bb.preprocessing)).numpy()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    split = json.loads((res.run_dir / "split.json").read_text())
    test_paths = {path for paths in split["parts"]["test"].values() for path in paths}
    assert _split_map(emb, np.asarray(ds.labels), ds.paths, test_paths) == pytest.approx(test, abs=1e-4)
    assert load_embedder(res.run_dir).dim == 16
    assert "trained embedding" in (res.run_dir / "report.md").read_text()


class _StopAfter(L.Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epochs:
            raise KeyboardInterrupt


def test_resumed_metric_run_ends_with_the_same_weights(scenes, tmp_path):
    # balanced batches and learnable proxies must both survive the interruption
    extra = ("loss.name=proxy_anchor", "data.samples_per_class=4", "trainer.epochs=4", "model.embedding_bn=true",
             "optim.schedule=step", "optim.step_size=2")
    full = train(_cfg(scenes, tmp_path / "full", *extra), progress=False, cache_dir=tmp_path / "cache")
    cfg = _cfg(scenes, tmp_path / "cut", *extra)
    cut = train(cfg, progress=False, callbacks=[_StopAfter(2)], cache_dir=tmp_path / "cache")
    assert cut.status == "interrupted"
    resumed = train(cfg, resume=True, progress=False, cache_dir=tmp_path / "cache")
    assert resumed.status == "complete"
    a = load_file(str(tmp_path / "full/model.safetensors"))
    b = load_file(str(tmp_path / "cut/model.safetensors"))
    assert a.keys() == b.keys() and "head.bn.running_mean" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert full.results["val"] == resumed.results["val"]
    ckpt = torch.load(tmp_path / "cut/checkpoints/last.ckpt", weights_only=True)
    assert any(k.startswith("loss_fn.loss.proxies") for k in ckpt["state_dict"])


def test_partial_fine_tuning_on_images(scenes, tmp_path):
    cfg = _cfg(scenes, tmp_path / "img", "model.backbone=test_resnet", "model.weights=none", "data.input_size=32",
               "model.strategy=partial", "model.unfreeze_stages=1", "data.augment=dihedral", "loss.name=arcface",
               "trainer.epochs=2", "data.batch_size=8")
    torch.manual_seed(0)
    res = train(cfg, progress=False)
    r = res.results
    assert r["feature_cache"] is False and r["strategy"]["strategy"] == "partial"
    trained = load_file(str(res.run_dir / "model.safetensors"))
    from landlens.training.engine import build_model

    L.seed_everything(0, verbose=False)
    start = build_model(cfg, ["a", "b", "c", "d"]).state_dict()
    frozen = [k for k in trained if k.startswith(("backbone.body.conv1", "backbone.body.layer3"))]
    last = [k for k in trained if k.startswith("backbone.body.layer4") and k.endswith("weight")]
    assert frozen and last
    for k in frozen:  # early stages stay as they started ...
        torch.testing.assert_close(trained[k], start[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(trained[k], start[k]) for k in last)  # ... the last one trained
    with torch.inference_mode():
        e = create_backbone(f"run:{res.run_dir}")(torch.randn(3, 3, 32, 32))
    np.testing.assert_allclose(e.norm(dim=1).numpy(), 1.0, atol=1e-5)

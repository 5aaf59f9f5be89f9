"""Matching runs end to end (landlens.matching.config / train): autoencoder pre-training and fine-tuning,
latent features, pair sampling, discriminator training, resume, and retrieval with the learned distance."""

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

from fixtures.make_datasets import make_bad_files, make_folder_dataset
from landlens.data.splits import SplitManifest
from landlens.errors import ConfigError, DatasetError, FeatureMismatchError
from landlens.features.store import FeatureSet
from landlens.matching.config import load_matching_config
from landlens.matching.scoring import load_discriminator, read_discriminator_meta
from landlens.matching.train import (
    PairSampler,
    encode_dataset,
    evaluate_matching,
    feature_shape,
    finetune_ae,
    load_autoencoder,
    prepare_pairs,
    pretrain_ae,
    read_autoencoder_meta,
    train_dml,
)
from landlens.reports.figures import grid_size

CLASSES = ["beach", "forest", "river"]
TINY = ["data.num_workers=0", "data.batch_size=8", "ae.widths=[4,8,8]", "ae.latent_channels=8"]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: the tiny networks are fastest so, and the machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, one_thread):
    """pretrain-ae -> finetune-ae -> train-dml on 3 classes x 8 images of 32 px (AE input 64)."""
    tmp = tmp_path_factory.mktemp("matching")
    folder = make_folder_dataset(tmp / "scenes", CLASSES, per_class=8, size=32)
    pre = pretrain_ae(load_matching_config(None, [f"data.path={folder}", f"out={tmp / 'pre'}", "optim.epochs=2",
                                                  *TINY]), progress=False)
    ft = finetune_ae(load_matching_config(None, [f"data.path={folder}", f"out={tmp / 'ft'}", "optim.epochs=2",
                                                 *TINY]), init=tmp / "pre", progress=False)
    dml_cfg = load_matching_config(None, [f"data.path={folder}", f"out={tmp / 'dml'}", f"features.ae={tmp / 'ft'}",
                                          f"features.cache_dir={tmp / 'cache'}", "dml.width=8", "optim.epochs=3",
                                          "pairs.per_epoch=64", "pairs.val_pairs=32", *TINY])
    dml = train_dml(dml_cfg, progress=False)
    return {"tmp": tmp, "folder": folder, "pre": pre, "ft": ft, "dml": dml, "dml_cfg": dml_cfg}


def _images(folder: Path, paths: list[str], size: int = 64) -> torch.Tensor:
    """Images as the autoencoder sees them, computed independently (PIL bilinear squash, /255)."""
    arrs = [np.asarray(Image.open(folder / p).convert("RGB").resize((size, size), Image.Resampling.BILINEAR),
                       dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- config

def test_config_overrides_file_and_errors(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("data:\n  path: /x\n  input_size: 128\nae:\n  widths: [8, 16, 32]\noptim:\n  lr: 0.01\n")
    cfg = load_matching_config(f, ["ae.latent_channels=16", "pairs.positive_fraction=0.25", "out=/o"])
    assert cfg.data.input_size == 128 and cfg.ae.widths == [8, 16, 32] and cfg.ae.latent_channels == 16
    assert cfg.optim.lr == 0.01 and cfg.pairs.positive_fraction == 0.25 and cfg.out == "/o"
    assert cfg.ae_config().latent_shape == (16, 8, 8) and cfg.ae_config().stem_stride == 2
    d = load_matching_config(None, [])
    # the paper's optimisation: SGD from 0.001, x0.2 on plateau, early stopping after 10 epochs
    assert (d.optim.name, d.optim.lr, d.optim.plateau_factor, d.optim.patience) == ("sgd", 0.001, 0.2, 10)
    assert d.data.input_size == 64 and d.pairs.positive_fraction == 0.5
    with pytest.raises(ConfigError, match="ae.depth"):
        load_matching_config(None, ["ae.depth=3"])
    with pytest.raises(ConfigError, match="unknown section 'model'"):
        load_matching_config(None, ["model.backbone=x"])
    with pytest.raises(ConfigError, match="optim.name"):
        load_matching_config(None, ["optim.name=rmsprop"])
    with pytest.raises(ConfigError, match="input_size 96"):
        load_matching_config(None, ["data.input_size=96"])
    with pytest.raises(ConfigError, match="pairs.positive_fraction"):
        load_matching_config(None, ["pairs.positive_fraction=1.5"])
    with pytest.raises(ConfigError, match="features.ae and features.backbone"):
        load_matching_config(None, ["features.ae=/a", "features.backbone=resnet18"])


# ----------------------------------------------------------------------------- autoencoder runs

def test_pretrain_writes_its_artefacts_and_reproducible_loss(pipeline):
    run, folder = pipeline["pre"].run_dir, pipeline["folder"]
    assert pipeline["pre"].status == "complete"
    for name in ("config.json", "images.json", "autoencoder.safetensors", "autoencoder.json", "reconstructions.png",
                 "latent_maps.png", "history.csv", "history.json", "learning_curves.png", "results.json",
                 "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (run / name).is_file(), name
    images = json.loads((run / "images.json").read_text())
    # every image of the folder (labels ignored), 10 % (2 of 24) held out for validation
    assert len(images["val"]) == 2 and len(images["train"]) == 22
    assert sorted(images["train"] + images["val"]) == sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jpg"))
    res = json.loads((run / "results.json").read_text())
    assert res["epochs_run"] == 2 and len(json.loads((run / "history.json").read_text())) == 2
    ae = load_autoencoder(run)
    assert ae.config.latent_shape == (8, 8, 8)
    with torch.inference_mode():
        x = _images(folder, images["val"])
        recon, z = ae(x)
    assert z.shape == (2, 8, 8, 8)
    assert res["val_mse"] == pytest.approx(float(((recon - x) ** 2).mean()), rel=1e-4)
    # originals over reconstructions: 2 columns x 2 rows of 64-px cells with captions
    w, h = Image.open(run / "reconstructions.png").size
    assert (w, h) == grid_size(4, 2, 64, 64, titles=True)


def test_pretrain_searches_recursively_and_skips_unreadable_files(tmp_path, one_thread):
    corpus = tmp_path / "corpus"
    make_folder_dataset(corpus / "deep" / "er", ["x", "y"], per_class=3, size=32)
    bad = make_bad_files(tmp_path / "bad")["truncated"]
    (corpus / "broken.png").write_bytes(bad.read_bytes())
    (corpus / ".hidden.png").write_bytes(bad.read_bytes())
    cfg = load_matching_config(None, [f"data.path={corpus}", f"out={tmp_path / 'pre'}", "data.val_fraction=0",
                                      "optim.epochs=1", *TINY])
    res = pretrain_ae(cfg, progress=False)
    images = json.loads((tmp_path / "pre" / "images.json").read_text())
    assert len(images["train"]) == 7 and images["val"] == [] and "broken.png" in images["train"]
    assert res.results["unreadable"]["count"] == 1 and list(res.results["unreadable"]["first"]) == ["broken.png"]
    # no validation images: the training loss is monitored and the best checkpoint still kept
    assert res.results["val_mse"] is None and res.results["best_epoch"] == 1
    assert (tmp_path / "pre" / "checkpoints" / "best.ckpt").is_file()


def test_finetune_starts_from_pretrained_weights_and_reads_only_the_train_part(pipeline):
    ft, pre, folder = pipeline["ft"].run_dir, pipeline["pre"].run_dir, pipeline["folder"]
    res = json.loads((ft / "results.json").read_text())
    assert res["init"]["weights_digest"] == read_autoencoder_meta(pre)["weights_digest"]
    assert read_autoencoder_meta(ft)["weights_digest"] != read_autoencoder_meta(pre)["weights_digest"]
    split = SplitManifest.load(ft / "split.json")
    used = json.loads((ft / "images.json").read_text())
    test_paths, _ = split.part("test")
    train_paths, _ = split.part("train")
    assert len(test_paths) == 6 and not set(test_paths) & set(used["train"] + used["val"])
    assert sorted(used["train"] + used["val"]) == sorted(train_paths)
    # another architecture than the pre-trained one is refused, naming the key
    cfg = load_matching_config(None, [f"data.path={folder}", f"out={pipeline['tmp'] / 'ft2'}", *TINY,
                                      "ae.latent_channels=16"])
    with pytest.raises(ConfigError, match="ae.latent_channels=16"):
        finetune_ae(cfg, init=pre, progress=False)
    assert not (pipeline["tmp"] / "ft2" / "checkpoints").exists()


def test_encoded_rows_are_the_flattened_latent_maps(pipeline):
    ft, folder, cache = pipeline["ft"].run_dir, pipeline["folder"], pipeline["tmp"] / "cache"
    fs = encode_dataset(ft, folder, cache_dir=cache, workers=0, progress=False)
    assert fs.features.shape == (24, 8 * 8 * 8) and feature_shape(fs) == (8, 8, 8)
    assert fs.meta["identity"]["weights_digest"] == read_autoencoder_meta(ft)["weights_digest"]
    ae = load_autoencoder(ft)
    with torch.inference_mode():
        ref = ae.encode(_images(folder, fs.paths[:3])).flatten(1).numpy()
    np.testing.assert_allclose(fs.features[:3], ref, rtol=1e-3, atol=1e-4)
    # a second call reuses the store (train_dml already filled it): same rows
    again = encode_dataset(ft, folder, cache_dir=cache, workers=0, progress=False)
    np.testing.assert_array_equal(again.features, fs.features)
    digests = [json.loads(m.read_text())["identity"]["weights_digest"] for m in cache.rglob("meta.json")]
    assert digests.count(fs.meta["identity"]["weights_digest"]) == 1


# ----------------------------------------------------------------------------- pairs

def test_pair_sampler_balance_classes_rows_and_epochs():
    labels = np.array([0] * 6 + [1] * 6 + [2] * 6 + [3])
    allowed = np.array([0, 1, 2, 3, 6, 7, 8, 12, 13, 18])  # class 3 has one image: never a positive anchor
    s = PairSampler(labels, allowed, per_epoch=200, positive_fraction=0.3, seed=5)
    a, b, y = s.sample()
    assert len(y) == 200 and y.sum() == 60  # round(200 * 0.3) matching pairs
    assert set(a) | set(b) <= set(allowed.tolist())
    assert np.all(labels[a[y == 1]] == labels[b[y == 1]]) and np.all(a[y == 1] != b[y == 1])
    assert np.all(labels[a[y == 0]] != labels[b[y == 0]])
    assert 18 in set(a[y == 0]) | set(b[y == 0])
    again = PairSampler(labels, allowed, per_epoch=200, positive_fraction=0.3, seed=5)
    np.testing.assert_array_equal(np.stack(again.sample()), np.stack((a, b, y)))  # depends on (seed, epoch) only
    s.set_epoch(1)
    assert not np.array_equal(np.stack(s.sample()), np.stack((a, b, y)))
    assert list(iter(s))[:3] == list(zip(*[v[:3].tolist() for v in s.sample(1)]))
    with pytest.raises(DatasetError, match="share a class"):
        PairSampler(labels, np.array([0, 6, 12]), per_epoch=10)
    with pytest.raises(DatasetError, match="one class"):
        PairSampler(labels, np.array([0, 1, 2]), per_epoch=10)


def test_pairs_never_touch_the_test_part(pipeline):
    fs = encode_dataset(pipeline["ft"].run_dir, pipeline["folder"], cache_dir=pipeline["tmp"] / "cache", workers=0,
                        progress=False)
    pairs = prepare_pairs(pipeline["dml_cfg"], fs)
    test_paths = set(SplitManifest.load(pipeline["dml"].run_dir / "split.json").part("test")[0])
    assert len(test_paths) == 6
    assert {fs.paths[i] for i in pairs.parts["test"]} == test_paths
    loader = pairs.train_dataloader()
    assert loader.batch_sampler.sampler is pairs.sampler  # the sampler Lightning re-seeds every epoch
    seen = set()
    for epoch in range(5):
        pairs.sampler.set_epoch(epoch)
        a, b, y = pairs.sampler.sample()
        seen |= {fs.paths[i] for i in np.concatenate([a, b])}
        assert 0.5 == y.mean() and np.all((fs.labels[a] == fs.labels[b]) == (y == 1))
    va, vb, vy = pairs.val_pairs
    seen_val = {fs.paths[i] for i in np.concatenate([va, vb])}
    assert not (seen | seen_val) & test_paths
    # training pairs come from the train part less the held-out slice; each validation pair holds a held-out image
    held = {fs.paths[i] for i in pairs.val_rows}
    assert held and not seen & held
    assert all(fs.paths[i] in held or fs.paths[j] in held for i, j in zip(va, vb))


# ----------------------------------------------------------------------------- discriminator runs

def _toy(digest: str = "toy-v1", n_per: int = 20, seed: int = 0) -> FeatureSet:
    """3 classes on a small circle in two dimensions, buried under four dimensions of large noise."""
    rng = np.random.default_rng(seed)
    rows, labels, paths = [], [], []
    for c, name in enumerate(["a", "b", "c"]):
        ang = 2 * np.pi * c / 3
        for i in range(n_per):
            signal = np.array([np.cos(ang), np.sin(ang)]) + rng.normal(0, 0.15, 2)
            rows.append(np.concatenate([signal, rng.normal(0, 3.0, 4)]))
            labels.append(c)
            paths.append(f"{name}/{name}_{i}.png")
    meta = {"identity": {"backbone": "toy", "weights_digest": digest},
            "dataset": {"name": "toy", "classes": list("abc")}}
    x = np.asarray(rows, np.float32)
    return FeatureSet(x, paths, np.asarray(labels, np.int64), list("abc"), meta, np.ones(len(x), bool))


def _toy_cfg(out: Path, *extra: str):
    return load_matching_config(None, [f"out={out}", "dml.width=16", "optim.name=adam", "optim.lr=0.01",
                                       "optim.patience=null", "pairs.per_epoch=512", "pairs.val_pairs=200",
                                       "data.batch_size=64", "data.split=50/50", *extra])


def test_dml_on_separable_vectors_beats_euclidean(tmp_path, one_thread):
    fs = _toy()
    res = train_dml(_toy_cfg(tmp_path / "d", "optim.epochs=25"), fs, progress=False)
    assert res.status == "complete"
    meta = read_discriminator_meta(tmp_path / "d")
    assert meta["config"]["in_channels"] == 6 and meta["config"]["spatial"] == 1
    assert meta["extra"]["features"] == {"backbone": "toy", "weights_digest": "toy-v1", "dim": 6, "shape": [6, 1, 1]}
    assert res.results["val_pairs"]["accuracy"] >= 0.95
    ev = evaluate_matching(tmp_path / "d", fs)
    # Euclidean distance is dominated by the noise dimensions; the discriminator learned to ignore them
    assert ev.baseline.metrics["mAP"] < 0.5 < 0.9 < ev.learned.metrics["mAP"]
    # the baseline's mAP, recomputed with scikit-learn on the split protocol (test part queries the archive)
    split = SplitManifest.load(tmp_path / "d" / "split.json")
    q_rows = split.indices("test", fs.paths)
    aps = []
    for q in q_rows:
        others = np.delete(np.arange(len(fs)), q)
        d = np.linalg.norm(fs.features[others] - fs.features[q], axis=1)
        aps.append(average_precision_score(fs.labels[others] == fs.labels[q], -d))
    assert ev.baseline.metrics["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)


class _StopAfter(L.Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_start(self, trainer, pl_module):  # as a Ctrl+C early in the next epoch
        if trainer.current_epoch == self.epochs:
            raise KeyboardInterrupt


def test_dml_resume_continues_to_the_same_weights(tmp_path, one_thread):
    fs = _toy()
    extra = ("optim.epochs=4", "pairs.per_epoch=64", "data.batch_size=16")
    train_dml(_toy_cfg(tmp_path / "full", *extra), fs, progress=False)
    cfg = _toy_cfg(tmp_path / "cut", *extra)
    cut = train_dml(cfg, fs, progress=False, callbacks=[_StopAfter(2)])
    assert cut.status == "interrupted" and "--resume" in cut.results["resume"]
    ckpt = torch.load(tmp_path / "cut/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 * 4  # 64 pairs / batch 16 = 4 steps per epoch
    resumed = train_dml(cfg, fs, resume=True, progress=False)
    assert resumed.status == "complete"
    a = load_file(str(tmp_path / "full/discriminator.safetensors"))
    b = load_file(str(tmp_path / "cut/discriminator.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    hist = json.loads((tmp_path / "cut/history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    # a finished run is neither overwritten nor retrained
    before = (tmp_path / "cut/discriminator.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        train_dml(cfg, fs, progress=False)
    again = train_dml(cfg, fs, resume=True, progress=False)
    assert again.status == "complete" and again.results == resumed.results
    assert (tmp_path / "cut/discriminator.safetensors").read_bytes() == before


def test_discriminator_refuses_other_features(tmp_path, one_thread):
    train_dml(_toy_cfg(tmp_path / "d", "optim.epochs=1", "pairs.per_epoch=64"), _toy(), progress=False)
    with pytest.raises(FeatureMismatchError, match="weights_digest") as err:
        evaluate_matching(tmp_path / "d", _toy(digest="toy-v2"))
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- retrieval of the pipeline

def _ap(relevant: np.ndarray, dist: np.ndarray) -> float:
    """Non-interpolated AP of a ranking by ascending distance, ties by index (stable)."""
    order = np.argsort(dist, kind="stable")
    hits = np.flatnonzero(relevant[order]) + 1
    return float(np.mean(np.arange(1, len(hits) + 1) / hits))


def test_evaluate_matching_metrics_match_a_direct_computation(pipeline):
    dml = pipeline["dml"].run_dir
    assert pipeline["dml"].status == "complete"
    for name in ("discriminator.safetensors", "discriminator.json", "split.json", "results.json", "history.json",
                 "learning_curves.png", "checkpoints/best.ckpt"):
        assert (dml / name).is_file(), name
    meta = read_discriminator_meta(dml)
    ft_digest = read_autoencoder_meta(pipeline["ft"].run_dir)["weights_digest"]
    assert meta["extra"]["features"]["weights_digest"] == ft_digest and meta["extra"]["features"]["shape"] == [8, 8, 8]
    res = pipeline["dml"].results
    assert res["data"]["parts"] == {"train": 18, "test": 6} and res["data"]["val_pairs"] == 32
    assert res["test_pairs"]["pairs"] == 6 * 5  # capped at the distinct ordered pairs of the 6 test images
    fs = encode_dataset(pipeline["ft"].run_dir, pipeline["folder"], cache_dir=pipeline["tmp"] / "cache", workers=0,
                        progress=False)
    ev = evaluate_matching(dml, fs)
    out = ev.to_dict()
    assert out["learned"]["distance"]["name"] == "learned" and out["baseline"]["distance"]["name"] == "euclidean"
    assert out["learned"]["protocol"]["n_queries"] == 6 and set(out["learned"]["classwise_map"]) == set(CLASSES)
    # the learned mAP, recomputed by calling the discriminator on one pair at a time
    disc = load_discriminator(dml)
    x = torch.from_numpy(fs.features)
    q_rows = SplitManifest.load(dml / "split.json").indices("test", fs.paths)
    aps = []
    with torch.inference_mode():
        for q in q_rows:
            others = np.delete(np.arange(len(fs)), q)
            p = torch.softmax(disc(x[q].expand(len(others), -1), x[others]), 1)[:, 1].numpy()
            aps.append(_ap(fs.labels[others] == fs.labels[q], 1.0 - p))
    assert ev.learned.metrics["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)
    # the autoencoder's split is respected: another seed would test on images it was fine-tuned on
    cfg = load_matching_config(None, [f"data.path={pipeline['folder']}", f"out={pipeline['tmp'] / 'leak'}",
                                      f"features.ae={pipeline['ft'].run_dir}", "data.seed=3",
                                      f"features.cache_dir={pipeline['tmp'] / 'cache'}", *TINY])
    with pytest.raises(ConfigError, match="fine-tuned on"):
        train_dml(cfg, progress=False)


def test_discriminator_refuses_latents_of_another_autoencoder(pipeline):
    other = encode_dataset(pipeline["pre"].run_dir, pipeline["folder"], cache_dir=pipeline["tmp"] / "cache",
                           workers=0, progress=False)
    with pytest.raises(FeatureMismatchError, match="weights_digest") as err:
        evaluate_matching(pipeline["dml"].run_dir, other)
    assert "\n" not in str(err.value)


def _d4_elements(x: torch.Tensor) -> list[torch.Tensor]:
    """The eight elements of D4 on a (C, H, W) map, written out with numpy (rot90 then mirror)."""
    a = x.numpy()
    rots = [np.rot90(a, k, axes=(1, 2)) for k in range(4)]
    return [torch.from_numpy(np.ascontiguousarray(r)) for r in rots + [r[:, :, ::-1] for r in rots]]


def test_dihedral_pair_augmentation_turns_each_map_on_its_own(one_thread):
    from landlens.matching.networks import DMLConfig, MatchingDiscriminator
    from landlens.matching.tasks import DMLTask, random_dihedral

    torch.manual_seed(0)
    maps = torch.randn(64, 3, 4, 4)
    out = random_dihedral(maps)
    which = []
    for x, y in zip(maps, out):
        found = [k for k, e in enumerate(_d4_elements(x)) if torch.equal(e, y)]
        assert found, "an augmented map is not a rotation or mirror image of its map"
        which.append(found[0])
    assert set(which) == set(range(8))  # every element is drawn
    vectors = torch.randn(5, 6, 1, 1)
    assert torch.equal(random_dihedral(vectors), vectors)  # vector features have no layout

    net = MatchingDiscriminator(DMLConfig(in_channels=3, spatial=4, width=8))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    net.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), args[1].clone())))
    a, b = torch.randn(32, 48), torch.randn(32, 48)  # flat rows, as the pair loader gives them
    for augment, turned in (("none", False), ("dihedral", True)):
        task = DMLTask(net, _toy_cfg(Path("unused"), f"pairs.augment={augment}"), "val_loss")
        task.training_step((a, b, torch.zeros(32, dtype=torch.long)), 0)
        got_a, got_b = seen[-1]
        same = [torch.equal(got_a[i].reshape(-1), a[i]) for i in range(32)]
        assert all(any(torch.equal(e, got_a[i].reshape(3, 4, 4)) for e in _d4_elements(a[i].reshape(3, 4, 4)))
                   for i in range(32))
        assert all(any(torch.equal(e, got_b[i].reshape(3, 4, 4)) for e in _d4_elements(b[i].reshape(3, 4, 4)))
                   for i in range(32))
        assert (not all(same)) == turned
    with pytest.raises(ConfigError, match="pairs.augment"):
        _toy_cfg(Path("unused"), "pairs.augment=rotate")

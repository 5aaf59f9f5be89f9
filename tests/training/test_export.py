"""ONNX and TorchScript export: parity with the checkpoint, top-1 on a real image, metadata, failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fixtures.make_datasets import class_image, write_image

import landlens.training.export as export_mod
from landlens.data.io import is_image_file, load_rgb
from landlens.errors import CheckpointError, ConfigError
from landlens.models.classifier import HeadConfig, build_classifier, load_classifier, save_classifier
from landlens.models.preprocessing import preprocess_images
from landlens.training.export import (check_export_parity, export_model, export_onnx, export_torchscript,
                                      read_export_meta)

pytestmark = pytest.mark.weights("ndf")

CLASSES = ["agricultural", "beach", "forest", "harbor", "river", "runway", "urban"]
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "UCMerced_LandUse"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SqueezeNet 1.1 with its packaged ImageNet weights (227 px) and a seeded SE head."""
    torch.manual_seed(3)
    model = build_classifier("tv_squeezenet1_1", CLASSES, HeadConfig("se", reduction=8), weights="package")
    d = tmp_path_factory.mktemp("export_run")
    save_classifier(model, d)
    return d


@pytest.fixture(scope="module")
def real_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real UC Merced scenes when ../shared/data has them, else generated 256 px scenes."""
    if SHARED.is_dir():
        found = sorted(p for p in (SHARED / "Images").glob("*/*") if is_image_file(p))
        if len(found) >= 2:
            return [found[0], found[len(found) // 2]]
    d = tmp_path_factory.mktemp("export_images")
    paths = [d / "scene_a.jpg", d / "scene_b.png"]
    write_image(paths[0], class_image(2, 0, (256, 256)))
    write_image(paths[1], class_image(5, 1, (256, 200)))
    return paths


@pytest.fixture(scope="module")
def checkpoint_out(run_dir: Path, real_images: list[Path]) -> tuple[torch.Tensor, np.ndarray]:
    """Preprocessed real images and the checkpoint's log-probabilities on them."""
    model = load_classifier(run_dir)
    x = preprocess_images([load_rgb(p) for p in real_images], model.preprocessing).contiguous()
    with torch.no_grad():
        return x, model(x).numpy()


def test_onnx_parity_metadata_and_top1(run_dir: Path, tmp_path: Path, real_images: list[Path],
                                       checkpoint_out: tuple[torch.Tensor, np.ndarray]) -> None:
    out = export_onnx(run_dir, tmp_path / "m.onnx")
    assert out == tmp_path / "m.onnx" and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left over
    # parity on other random inputs (another seed, another batch size)
    diff = check_export_parity(run_dir, out, n=3, seed=11, atol=None)
    assert 0.0 <= diff < 1e-4

    proto = onnx.load(str(out))
    props = {e.key: e.value for e in proto.metadata_props}
    model = load_classifier(run_dir)
    assert json.loads(props["landlens.classes"]) == CLASSES
    assert json.loads(props["landlens.preprocessing"]) == model.preprocessing.to_dict()
    assert json.loads(props["landlens.model"]) == json.loads((run_dir / "model.json").read_text())
    assert read_export_meta(out)["classes"] == CLASSES
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    s = model.preprocessing.input_size
    assert inp.name == "image" and inp.shape[1:] == [3, s, s] and not isinstance(inp.shape[0], int)
    assert [o.name for o in sess.get_outputs()] == ["log_probs"]
    x, ref = checkpoint_out
    got = sess.run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert got.argmax(1).tolist() == ref.argmax(1).tolist()
    assert np.exp(got).sum(1) == pytest.approx([1.0, 1.0], abs=1e-5)


def test_onnx_static_batch(run_dir: Path, tmp_path: Path) -> None:
    out = export_onnx(run_dir, tmp_path / "static.onnx", dynamic_batch=False, opset=13)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == 1
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert check_export_parity(run_dir, out, n=2, atol=None) < 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_parity_metadata_and_top1(run_dir: Path, checkpoint_out: tuple[torch.Tensor, np.ndarray]) -> None:
    out = export_torchscript(run_dir)
    assert out == run_dir / "model.torchscript.pt" and out.is_file()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]
    assert check_export_parity(run_dir, out, n=5, seed=4, atol=None) < 1e-4
    extra = {"model.json": ""}
    module = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["model.json"]) == json.loads((run_dir / "model.json").read_text())
    x, ref = checkpoint_out
    with torch.no_grad():
        got = module(x).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert got.argmax(1).tolist() == ref.argmax(1).tolist()


def test_export_result_reports_parity(run_dir: Path, tmp_path: Path) -> None:
    res = export_model(run_dir, "torchscript", tmp_path)  # a folder: default file name inside
    assert res.path == tmp_path / "model.torchscript.pt"
    assert res.format == "torchscript" and res.exporter == "torch.jit.trace" and res.n_checked == 4
    assert res.max_abs_diff == pytest.approx(check_export_parity(run_dir, res.path, atol=None), abs=1e-12)


def test_parity_failure_removes_file_and_keeps_old(run_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real_trace = export_mod._trace_torchscript

    def tampered(model, example, meta_text, tmp):
        with torch.no_grad():
            model.head.fc.bias[0] += 3.0  # changes the log-probabilities of the exported copy only
        real_trace(model, example, meta_text, tmp)

    monkeypatch.setattr(export_mod, "_trace_torchscript", tampered)
    out = tmp_path / "bad.pt"
    out.write_bytes(b"previous export")
    with pytest.raises(CheckpointError) as err:
        export_torchscript(run_dir, out)
    msg = str(err.value)
    assert str(out) in msg and "differs" in msg and "\n" not in msg
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_run_dir_without_model_json(tmp_path: Path) -> None:
    for call in (lambda: export_onnx(tmp_path), lambda: export_torchscript(tmp_path)):
        with pytest.raises(CheckpointError) as err:
            call()
        assert "model.json" in str(err.value) and str(tmp_path) in str(err.value)
        assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_parity_check_on_bad_files(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no exported model"):
        check_export_parity(run_dir, tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00 not a model")
    with pytest.raises(CheckpointError, match="junk.onnx"):
        check_export_parity(run_dir, junk)


def test_unknown_format(run_dir: Path) -> None:
    with pytest.raises(ConfigError, match="coreml"):
        export_model(run_dir, "coreml")

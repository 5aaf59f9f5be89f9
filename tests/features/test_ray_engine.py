"""Extraction on Ray Data (`engine="ray"`): the same store as the local engine (features to float
rounding, failures, meta), resuming a store the other engine started, and an actor killed mid-run
(the job finishes, every chunk written exactly once). Ray is started in this process with two
CPUs; without Ray these tests are skipped, and fail under CI (`scripts/setup.sh` installs it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from fixtures.weights import require
from landlens.features.extract import extract_features
from landlens.features.store import FeatureStore
from landlens.models.registry import create_backbone


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Ray on this machine (two CPUs); the fault-injection flag file exists (disarmed)."""
    require("ray", why="the Ray engine (pip install 'landlens[ray]')")
    from landlens.features.ray_engine import FAULT_ENV, connect

    flag = tmp_path_factory.mktemp("ray_flag") / "exit-once"
    flag.touch()
    os.environ[FAULT_ENV] = str(flag)  # inherited by the workers Ray starts below
    ray = connect(None, num_cpus=2)
    yield flag
    ray.shutdown()
    os.environ.pop(FAULT_ENV, None)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from landlens.data.folder import scan_folder

    root = tmp_path_factory.mktemp("ray_data")
    rng = np.random.default_rng(0)
    for ci, c in enumerate(("a", "b", "c")):
        (root / c).mkdir()
        for i in range(9):
            img = np.clip(rng.integers(0, 60, (40, 48, 3)) + 150 * np.eye(3)[ci], 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{c}_{i}.png")
    (root / "b" / "b_broken.png").write_bytes(b"not a png")
    return scan_folder(root)


@pytest.fixture(scope="module")
def backbone() -> Any:
    bb = create_backbone("resnet18", "none")
    bb.preprocessing = bb.preprocessing.replace(input_size=32, resize_mode="squash")
    return bb


def _extract(data: Any, bb: Any, out: Path, **kw: Any) -> Any:
    return extract_features(data.root, data.paths, data.labels, data.classes, bb, out, batch_size=4, chunk_size=8,
                            progress=False, **kw)


@pytest.fixture(scope="module")
def local(data: Any, backbone: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    res = _extract(data, backbone, tmp_path_factory.mktemp("local") / "store", workers=0)
    return FeatureStore(res.store).load()


def test_ray_and_local_stores_agree(ray_session: Path, data: Any, backbone: Any, local: Any, tmp_path: Path) -> None:
    res = _extract(data, backbone, tmp_path / "store", engine="ray", actors=2)
    fs = FeatureStore(res.store).load()
    assert fs.paths == local.paths and (fs.valid == local.valid).all() and (~fs.valid).sum() == 1
    diff = float(np.abs(fs.features[fs.valid] - local.features[local.valid]).max())
    print(f"max abs difference ray vs local: {diff:.3g}")
    assert diff < 1e-5
    assert fs.meta["failures"] == local.meta["failures"] and fs.meta["failures"][0]["path"].endswith("b_broken.png")
    assert fs.meta["identity"] == local.meta["identity"] and fs.meta["last_run"]["engine"] == "ray"


def test_ray_resumes_a_local_store(ray_session: Path, data: Any, backbone: Any, local: Any, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from landlens.features import extract as extract_mod

    out = tmp_path / "store"
    calls = {"n": 0}
    real = extract_mod.FeatureStore.write_chunk

    def stop_after_two(self, index, *a, **k):  # noqa: ANN001, ANN202 - the local run dies after two chunks
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, index, *a, **k)

    monkeypatch.setattr(extract_mod.FeatureStore, "write_chunk", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        _extract(data, backbone, out, workers=0)
    monkeypatch.setattr(extract_mod.FeatureStore, "write_chunk", real)
    assert len(FeatureStore(out).completed_chunks()) == 2
    res = _extract(data, backbone, out, engine="ray", actors=1)
    assert res.n_extracted == len(data.paths) - 16  # only the chunks the local run had not written
    fs = FeatureStore(out).load()
    np.testing.assert_allclose(fs.features[fs.valid], local.features[local.valid], rtol=0, atol=1e-5)


def test_an_actor_killed_mid_run(ray_session: Path, data: Any, backbone: Any, local: Any, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from landlens.features.store import FeatureStore as Store

    writes: list[int] = []
    real = Store.write_chunk

    def counted(self, index, *a, **k):  # noqa: ANN001, ANN202
        writes.append(int(index))
        return real(self, index, *a, **k)

    monkeypatch.setattr(Store, "write_chunk", counted)
    ray_session.unlink()  # armed: the first actor to run a batch exits
    res = _extract(data, backbone, tmp_path / "store", engine="ray", actors=2)
    assert ray_session.exists()  # an actor did die
    assert sorted(writes) == list(range(4))  # 28 images in chunks of 8: each written once
    fs = FeatureStore(res.store).load()
    np.testing.assert_allclose(fs.features[fs.valid], local.features[local.valid], rtol=0, atol=1e-5)


def test_engine_settings_are_checked(data: Any, backbone: Any, tmp_path: Path) -> None:
    from landlens.errors import LandlensError

    with pytest.raises(LandlensError, match="--engine ray"):
        _extract(data, backbone, tmp_path / "s", actors=2)
    with pytest.raises(LandlensError, match="unknown engine"):
        _extract(data, backbone, tmp_path / "s", engine="spark")


def test_the_local_engine_never_imports_ray(tmp_path: Path) -> None:
    """Without Ray the local engine works and imports nothing of it; --engine ray says how to get it."""
    import subprocess
    import sys

    code = f"""
import sys
sys.modules["ray"] = None  # as if Ray were not installed
import numpy as np
from PIL import Image
from landlens.cli.main import cli
from landlens.data.folder import scan_folder
from landlens.errors import LandlensError
from landlens.features.extract import extract_features
from landlens.models.registry import create_backbone
root = {str(tmp_path / "d")!r}
import os
for c in "ab":
    os.makedirs(f"{{root}}/{{c}}")
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i + (100 if c == "a" else 0), np.uint8)).save(f"{{root}}/{{c}}/{{i}}.png")
ds = scan_folder(root)
bb = create_backbone("lbp_rgb", "none")
extract_features(ds.root, ds.paths, ds.labels, ds.classes, bb, {str(tmp_path / "s")!r}, workers=0, progress=False)
try:
    extract_features(ds.root, ds.paths, ds.labels, ds.classes, bb, {str(tmp_path / "t")!r}, engine="ray", progress=False)
except LandlensError as exc:
    print("ERR", exc)
print("RAY" if any(m == "ray" or m.startswith("ray.") for m in sys.modules if sys.modules[m] is not None) else "NORAY")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERR --engine ray needs Ray Data: pip install 'landlens[ray]'" in out.stdout
    assert out.stdout.strip().endswith("NORAY")


def test_index_build_of_a_scene_on_ray(ray_session: Path, tmp_path: Path) -> None:
    """`landlens index build SCENE.tif --engine ray`: the chips of a scene, read by window in the
    Ray decode tasks, indexed with the vectors the local engine gives."""
    from click.testing import CliRunner

    from fixtures.scenes import utm_scene
    from landlens.cli.main import cli
    from landlens.retrieval.archive import Archive

    require("rasterio", why="scenes (pip install 'landlens[scenes]')")
    scene = utm_scene(tmp_path / "utm.tif")[0]
    local = Archive.build_from_scenes([scene], tmp_path / "local.archive", chip=64, backbone="lbp_rgb", rerank=None,
                                      workers=0, progress=False, cache_dir=tmp_path / "cache-local")
    res = CliRunner().invoke(cli, ["index", "build", str(scene), "--chip", "64", "--out", str(tmp_path / "ray.archive"),
                                   "-b", "lbp_rgb", "--plain", "--engine", "ray", "--actors", "1", "--cache-dir",
                                   str(tmp_path / "cache-ray")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ray_arch = Archive.open(tmp_path / "ray.archive")
    assert [r.path for r in ray_arch.records()] == [r.path for r in local.records()] and len(local) == 18
    np.testing.assert_allclose(np.stack([ray_arch.vector(r.id) for r in ray_arch.records()]),
                               np.stack([local.vector(r.id) for r in local.records()]), rtol=0, atol=1e-6)

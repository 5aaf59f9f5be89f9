"""GeoEmbed v3 in PyTorch vs the package's netcl network and vs an independent numpy network.

Measured max abs differences of the 256-d embeddings (CPU, float32): ~1e-7 against
geoembed's own ``TileEncoderV3`` on netcl's NumPy backend, ~1e-7 against the float64 numpy
re-implementation below.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from fixtures.weights import require
import torch

from landlens.errors import WeightsError
from landlens.models.geoembed import GeoEmbedV3
from landlens.models.packaged import PACKAGED

EPS = 1e-5  # netcl BatchNorm2dModule default (netcl/nn/batchnorm.py), as torch's


def _installed():
    pw = PACKAGED["geoembed-v3"]
    require(pw.distribution)
    return pw


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    """Two 128x128 'tiles' in [-1, 1] with some spatial structure (smoothed noise)."""
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    x = np.kron(x, np.ones((1, 1, 4, 4), np.float32))  # blocky 128x128
    x += 0.2 * rng.standard_normal(x.shape).astype(np.float32)
    return np.clip(x, -1, 1)


@pytest.fixture(scope="module")
def converted():
    pw = _installed()
    net = GeoEmbedV3()
    res = net.load_state_dict(pw.load_state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    return net.eval()


# ----------------------------------------------------------------- independent numpy network


def _conv(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Cross-correlation, NCHW x OIHW, via explicit im2col and einsum (float64)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # B,C,H',W',kh,kw
    win = win[:, :, ::stride, ::stride]
    return np.einsum("bchwij,ocij->bohw", win, w, optimize=True)


def _bn(x: np.ndarray, d: dict[str, np.ndarray], p: str) -> np.ndarray:
    g, b, m, v = (d[f"{p}.{s}"].astype(np.float64) for s in ("weight", "bias", "running_mean", "running_var"))
    return (x - m[:, None, None]) / np.sqrt(v[:, None, None] + EPS) * g[:, None, None] + b[:, None, None]


def _numpy_geoembed_v3(x: np.ndarray, d: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """TileEncoderV3 as geoembed/arch.py describes it, from the npz's own keys (no landlens code)."""
    relu = lambda t: np.maximum(t, 0.0)  # noqa: E731
    w = lambda k: d[k].astype(np.float64)  # noqa: E731
    h = relu(_bn(_conv(x.astype(np.float64), w("bb.stem.0.weight"), 1, 1), d, "bb.stem.1"))
    for layer, stride in (("layer1", 1), ("layer2", 2), ("layer3", 2), ("layer4", 2)):
        for blk in (0, 1):
            p = f"bb.{layer}.{blk}"
            s = stride if blk == 0 else 1
            y = relu(_bn(_conv(h, w(f"{p}.conv1.weight"), s, 1), d, f"{p}.bn1"))
            y = _bn(_conv(y, w(f"{p}.conv2.weight"), 1, 1), d, f"{p}.bn2")
            sc = _bn(_conv(h, w(f"{p}.short.0.weight"), s, 0), d, f"{p}.short.1") if f"{p}.short.0.weight" in d else h
            h = relu(y + sc)
    feat = h  # (B, 512, 16, 16)
    b, c, hh, ww = feat.shape
    k = hh // 4
    pooled = feat.reshape(b, c, 4, k, 4, k).mean(axis=(3, 5))  # 4x4 average pool, stride 4
    z = pooled.reshape(b, -1) @ w("fc.weight") + w("fc.bias")  # fc.weight is (in, out)
    return z / np.clip(np.linalg.norm(z, axis=1, keepdims=True), 1e-8, None), feat


def test_matches_independent_numpy_network(converted, tiles):
    pw = _installed()
    with np.load(pw.locate(), allow_pickle=False) as npz:
        d = {k: npz[k] for k in npz.files}
    want, want_feat = _numpy_geoembed_v3(tiles, d)
    x = torch.from_numpy(tiles)
    with torch.inference_mode():
        feat = converted.forward_features(x)
        got = converted(x)
    assert feat.shape == (2, 512, 16, 16) and got.shape == (2, 256)
    np.testing.assert_allclose(feat.numpy(), want_feat, atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got.numpy(), axis=1), 1.0, atol=1e-5)


def test_matches_geoembed_netcl_reference(converted, tiles):
    """geoembed's own TileEncoderV3 + load_v3_netcl, on netcl's NumPy CPU backend."""
    require("netcl", why="geoembed's reference implementation")
    from netcl.core.device import manager  # imports pyopencl; no OpenCL device is needed for its NumPy backend

    pw = _installed()
    arch_py = pw.locate().parents[1] / "arch.py"
    spec = importlib.util.spec_from_file_location("_landlens_test_geoembed_arch", arch_py)
    arch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arch)  # type: ignore[union-attr]
    dev = manager.default("cpu")
    if dev is None:
        pytest.skip("netcl has no CPU device here")
    ref = arch.load_v3_netcl(str(pw.locate()), queue=dev.queue)
    want = ref.forward(np.ascontiguousarray(tiles))
    with torch.inference_mode():
        got = converted(torch.from_numpy(tiles)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_differs_from_random_init(converted, tiles):
    torch.manual_seed(0)
    rand = GeoEmbedV3().eval()
    x = torch.from_numpy(np.ascontiguousarray(tiles[:, :, :64, :64]))  # any multiple of 32 works
    with torch.inference_mode():
        a, b = converted(x), rand(x)
    assert torch.allclose(b.norm(dim=1), torch.ones(2), atol=1e-5)
    assert (a - b).abs().max() > 0.1


def test_architecture_shapes_without_weights():
    net = GeoEmbedV3().eval()
    assert net.num_features == 256 and net.feature_channels == 512
    assert net.fc.in_features == 512 * 4 * 4
    with torch.inference_mode():
        f = net.forward_features(torch.zeros(1, 3, 64, 64))
        z = net.forward_head(f, normalize=False)
    assert f.shape == (1, 512, 8, 8) and z.shape == (1, 256)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())


def test_converter_rejects_other_checkpoints(tmp_path):
    from landlens.models.converters.geoembed import convert, convert_arrays

    pw = _installed()
    with np.load(pw.locate(), allow_pickle=False) as npz:
        d = {k: npz[k] for k in npz.files}
    sd = convert_arrays(d)
    assert sd["fc.weight"].shape == (256, 8192)
    np.testing.assert_array_equal(sd["fc.weight"].numpy(), d["fc.weight"].T)
    assert "layer2.0.downsample.1.running_var" in sd and len(sd) == 102
    with pytest.raises(WeightsError, match="pool=2"):
        convert_arrays({**d, "pool_size": np.array([2], np.int32)})
    with pytest.raises(WeightsError, match="unexpected array"):
        convert_arrays({**d, "bb.extra.weight": np.zeros(1, np.float32)})
    bad = tmp_path / "v3.npz"
    bad.write_bytes(b"PK not really")
    with pytest.raises(WeightsError, match="cannot read GeoEmbed npz"):
        convert(bad)

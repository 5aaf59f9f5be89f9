"""Feature-map capture: values equal direct sub-module calls, hooks removed, errors, PNG grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from landlens.errors import ConfigError
from landlens.models.registry import create_backbone
from landlens.reports.figures import GRID_PAD, GRID_TITLE_PX
from landlens.training.feature_maps import (
    FEATURE_CELL_PX,
    capture_feature_maps,
    channel_images,
    list_layers,
    save_feature_maps,
)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("resnet18", weights="none")


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def test_list_layers_small_model_exact() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    assert list_layers(model, input_size=8) == ["0", "1"]
    assert _no_hooks(model)


def test_list_layers_resnet18_order(resnet18: nn.Module) -> None:
    names = list_layers(resnet18)
    assert names[:4] == ["body.conv1", "body.bn1", "body.act1", "body.maxpool"]
    for stage in ("body.layer1", "body.layer2", "body.layer3", "body.layer4"):
        assert stage in names
    assert names.index("body.layer1") < names.index("body.layer2") < names.index("body.layer4")
    assert "body.global_pool" not in names and "" not in names  # pooled (B, C) outputs are not maps
    assert _no_hooks(resnet18)


def test_capture_equals_direct_submodule_calls(resnet18: nn.Module) -> None:
    body = resnet18.body
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64)
    resnet18.train()  # capture must run in eval mode and restore the flag
    running_mean = body.bn1.running_mean.clone()
    maps = capture_feature_maps(resnet18, x, ["body.layer1", "body.bn1", "body.layer3"])
    assert list(maps) == ["body.layer1", "body.bn1", "body.layer3"]
    assert resnet18.training and body.training
    assert torch.equal(body.bn1.running_mean, running_mean)  # no BatchNorm statistics updated
    resnet18.eval()
    with torch.no_grad():
        bn = body.bn1(body.conv1(x))
        stem = body.maxpool(torch.relu(bn))
        l1 = body.layer1(stem)
        l3 = body.layer3(body.layer2(l1))
    torch.testing.assert_close(maps["body.bn1"], bn, atol=1e-6, rtol=0)
    # act1 is ReLU(inplace=True): the capture is a clone taken before it, so negatives survive
    assert (maps["body.bn1"] < 0).any()
    torch.testing.assert_close(maps["body.layer1"], l1, atol=1e-5, rtol=0)
    assert maps["body.layer1"].shape == (1, 64, 16, 16)
    torch.testing.assert_close(maps["body.layer3"], l3, atol=1e-5, rtol=0)
    assert _no_hooks(resnet18)
    # a (3, H, W) input is accepted as a batch of one
    again = capture_feature_maps(resnet18, x[0], ["body.layer1"])
    torch.testing.assert_close(again["body.layer1"], l1, atol=1e-5, rtol=0)


def test_bad_layer_names_valid_ones(resnet18: nn.Module) -> None:
    with pytest.raises(ConfigError, match="body.layer5") as info:
        capture_feature_maps(resnet18, torch.zeros(1, 3, 32, 32), ["body.layer1", "body.layer5"])
    msg = str(info.value)
    assert "\n" not in msg and "body.layer4" in msg  # a close valid name is suggested
    with pytest.raises(ConfigError, match="unknown layer"):
        capture_feature_maps(resnet18, torch.zeros(1, 3, 32, 32), ["nothing_like_it"])
    assert _no_hooks(resnet18)


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_hooks_removed_when_forward_fails() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 1), _Boom())
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        capture_feature_maps(model, torch.zeros(1, 3, 4, 4), ["0"])
    assert _no_hooks(model)
    assert model.training


def test_layer_that_never_runs() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv2d(3, 2, 1)
            self.unused = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(ConfigError, match="'unused' did not run"):
        capture_feature_maps(Skip(), torch.zeros(1, 3, 4, 4), ["used", "unused"])


def test_channel_images_are_min_max_scaled_per_channel() -> None:
    from matplotlib import colormaps

    lut = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    fmap = torch.tensor([[[[0.0, 5.0], [10.0, 10.0]], [[-3.0, -3.0], [-3.0, -3.0]], [[100.0, 200.0], [300.0, 500.0]]]])
    imgs = channel_images(fmap, max_channels=2)
    assert len(imgs) == 2
    assert np.array_equal(imgs[0], lut[np.array([[0, 128], [255, 255]])])  # 5 of 0..10 -> 127.5 -> 128
    assert np.array_equal(imgs[1], lut[np.zeros((2, 2), dtype=int)])  # constant channel -> bottom
    # the scale is per channel: a channel 100x larger looks the same shape of colours
    big = channel_images(fmap[:, 2:] , max_channels=8)[0]
    assert np.array_equal(big, lut[np.array([[0, 64], [128, 255]])])


def test_save_feature_maps_pngs(resnet18: nn.Module, tmp_path) -> None:
    x = torch.randn(1, 3, 64, 64)
    maps = capture_feature_maps(resnet18, x, ["body.bn1", "body.layer2"])
    image = Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8))
    paths = save_feature_maps(maps, tmp_path / "fm", max_channels=8, image=image)
    assert [p.name for p in paths] == ["00_body.bn1.png", "01_body.layer2.png"]
    assert sorted(p.name for p in (tmp_path / "fm").iterdir()) == [p.name for p in paths]
    c = FEATURE_CELL_PX
    for p in paths:  # 9 cells (input + 8 channels) in a 3x3 grid with caption bands
        with Image.open(p) as im:
            assert im.format == "PNG"
            assert im.size == (3 * c + 4 * GRID_PAD, 3 * (c + GRID_TITLE_PX) + 4 * GRID_PAD)
            grid = np.asarray(im.convert("RGB"))
        y0 = GRID_PAD + GRID_TITLE_PX
        # the input image comes first (64 px enlarged to the cell, nearest)
        assert (grid[y0:y0 + c, GRID_PAD:GRID_PAD + c] == 90).all()
    without = save_feature_maps({"body.layer2": maps["body.layer2"]}, tmp_path / "fm2", max_channels=100)
    with Image.open(without[0]) as im:  # layer2 has 128 channels: 100 shown, 10 x 10
        assert im.size == (10 * c + 11 * GRID_PAD, 10 * (c + GRID_TITLE_PX) + 11 * GRID_PAD)

"""GeoEmbed v3: a ResNet-18 tile encoder for aerial orthophotos, in PyTorch.

The architecture of ``TileEncoderV3`` / ``NetCLResNet18`` from the PyPI package ``geoembed``
1.1.2 (``geoembed/arch.py``; there written for the OpenCL framework ``netcl``), trained
self-supervised on aerial orthophoto tiles and shipped as ``geoembed/weights/v3.npz``:

- stem: 3x3 stride-1 convolution (64 channels, no bias), BatchNorm, ReLU; no max-pool (the
  CIFAR-style ResNet stem, so a 128x128 tile keeps full resolution into ``layer1``);
- ``layer1``..``layer4``: two BasicBlocks each (He et al., 2016, "Deep Residual Learning for
  Image Recognition", CVPR, Table 1, 18-layer column), widths 64/128/256/512, strides
  1/2/2/2, with a 1x1 convolution + BatchNorm shortcut where the shape changes;
- head: average pooling to a 4x4 grid (kernel = stride = H/4, i.e. 4x4 on the 16x16 ``layer4``
  map of a 128x128 input), flatten in (C, H, W) order to 8192, Linear to 256, L2-normalise.

BatchNorm uses eps 1e-5 (netcl's ``BatchNorm2dModule`` default). Input: RGB scaled to
[-1, 1] (``(x / 255 - 0.5) / 0.5``) after a bilinear resize of the whole tile to 128x128
(``geoembed/preprocess.py`` ``preprocess``; ``geoembed/models.py`` ``_CONFIGS['v3']``).

Module names follow timm's ResNet (``conv1``/``bn1``/``act1``/``conv2``/``bn2``/``act2``/
``downsample`` in each block), so the model reads like any other landlens backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """ResNet BasicBlock: 3x3 conv-BN-ReLU, 3x3 conv-BN, add the (projected) input, ReLU."""

    expansion = 1

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class GeoEmbedV3(nn.Module):
    """GeoEmbed v3 tile encoder: (B, 3, 128, 128) in [-1, 1] -> (B, 256) unit-length embeddings.

    Attributes:
        num_features: length of :meth:`forward`'s output (the embedding, 256).
        feature_channels: channels of :meth:`forward_features`' map (512).
        pool_size: side of the average-pooled grid the head flattens (4).
    """

    def __init__(self, embed_dim: int = 256, base: int = 64, pool_size: int = 4) -> None:
        super().__init__()
        self.num_features = int(embed_dim)
        self.embed_dim = int(embed_dim)
        self.pool_size = int(pool_size)
        self.feature_channels = base * 8
        self.stem = nn.Sequential(
            nn.Conv2d(3, base, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(base),
            nn.ReLU(inplace=True),
        )
        widths = (base, base * 2, base * 4, base * 8)
        strides = (1, 2, 2, 2)
        in_chs = base
        for i, (w, s) in enumerate(zip(widths, strides), start=1):
            self.add_module(f"layer{i}", nn.Sequential(BasicBlock(in_chs, w, s), BasicBlock(w, w, 1)))
            in_chs = w
        self.pool = nn.AdaptiveAvgPool2d(self.pool_size)
        self.fc = nn.Linear(self.feature_channels * self.pool_size * self.pool_size, self.embed_dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``layer4`` map, (B, 512, H/8, W/8): 16x16 for a 128x128 input."""
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """4x4 average pool, flatten (C, H, W), Linear, and (by default) L2-normalise.

        For maps whose side is a multiple of 4 the adaptive pool equals geoembed's
        ``avg_pool2d(kernel=H/4, stride=W/4)``.
        """
        x = self.fc(torch.flatten(self.pool(x), 1))
        return F.normalize(x, dim=1, eps=1e-8) if normalize else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


__all__ = ["BasicBlock", "GeoEmbedV3"]

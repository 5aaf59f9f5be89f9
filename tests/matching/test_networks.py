"""Residual-dyad matching networks (Khurshid et al.): units, autoencoders, discriminator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landlens.errors import ConfigError, LandlensError
from landlens.matching.networks import (
    AEConfig,
    DMLConfig,
    FeatureMismatchError,
    MatchingDiscriminator,
    ResidualAutoencoder,
    reconstruction_loss,
)
from landlens.matching.units import (
    PreActBlock,
    PreActDownBlock,
    PreActResBlock,
    PreActUpBlock,
    ResidualDyad,
    ResidualDyadUp,
)

TINY = (4, 8, 8)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def bn_relu(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Eval-mode BN then ReLU, written out: ``relu(gamma (x - mu) / sqrt(var + eps) + beta)``."""
    shape = (1, -1, 1, 1)
    y = (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    return torch.relu(y * bn.weight.view(shape) + bn.bias.view(shape))


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("kind", ["resdyad", "res"])
@pytest.mark.parametrize("size", [64, 128])
def test_autoencoder_shapes(kind: str, size: int) -> None:
    torch.manual_seed(0)
    ae = ResidualAutoencoder(AEConfig(kind=kind, input_size=size, widths=TINY, latent_channels=16)).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        z = ae.encode(x)
        recon, latent = ae(x)
    assert z.shape == (2, 16, 8, 8)
    assert latent.shape == (2, 16, 8, 8)
    assert recon.shape == (2, 3, size, size)
    assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0  # sigmoid output
    assert torch.allclose(ae.decode(z), recon)
    # no pooling anywhere: resolution falls only through strided convolutions
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)) for m in ae.modules())
    assert ae.stem.stride == (size // 64, size // 64)


def test_autoencoder_256_and_paper_latent() -> None:
    ae = ResidualAutoencoder(AEConfig(input_size=256, widths=TINY, latent_channels=512)).eval()
    with torch.no_grad():
        recon, z = ae(torch.rand(1, 3, 256, 256))
    assert z.shape == (1, 512, 8, 8) and recon.shape == (1, 3, 256, 256)


def test_autoencoder_stage_units() -> None:
    dyad = ResidualAutoencoder(AEConfig(kind="resdyad", widths=TINY, latent_channels=16))
    assert [type(m) for m in dyad.down] == [ResidualDyad] * 3
    assert [type(m) for m in dyad.up] == [ResidualDyadUp] * 3
    plain = ResidualAutoencoder(AEConfig(kind="res", widths=TINY, latent_channels=16))
    assert [type(m) for m in plain.down] == [PreActResBlock] * 3
    assert all(m.transpose and m.stride == 2 for m in plain.up)


@pytest.mark.parametrize("kind", ["resdyad", "res"])
@pytest.mark.parametrize("spatial", [8, 2, 1])
def test_discriminator_shapes(kind: str, spatial: int) -> None:
    torch.manual_seed(0)
    d = MatchingDiscriminator(DMLConfig(kind=kind, in_channels=6, spatial=spatial, width=8)).eval()
    a, b = torch.randn(5, 6, spatial, spatial), torch.randn(5, 6, spatial, spatial)
    with torch.no_grad():
        logits = d(a, b)
        flat = d(a.flatten(1), b.flatten(1))  # flattened rows (vector features when spatial = 1)
    assert logits.shape == (5, 2)
    assert torch.equal(logits, flat)
    assert d.features_shape == (6, spatial, spatial)
    assert d.feature_dim == 6 * spatial * spatial
    assert isinstance(d.unit, ResidualDyad if kind == "resdyad" else PreActResBlock)


def test_default_discriminator_is_the_paper_size() -> None:
    d = MatchingDiscriminator()
    assert d.features_shape == (512, 8, 8)
    assert d.concat_weight().shape == (128, 1024, 3, 3)
    assert d.fc.out_features == 2


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("size", [96, 32, 100, 192])
def test_bad_input_size_names_it(size: int) -> None:
    with pytest.raises(ConfigError, match="input_size") as info:
        AEConfig(input_size=size)
    assert "\n" not in str(info.value) and str(size) in str(info.value)


def test_config_round_trip_and_errors() -> None:
    cfg = AEConfig(kind="res", input_size=128, widths=(8, 16, 32), latent_channels=64)
    assert AEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.stem_stride == 2 and cfg.latent_shape == (64, 8, 8)
    dml = DMLConfig(kind="res", in_channels=32, spatial=1, width=16)
    assert DMLConfig.from_dict(dml.to_dict()) == dml
    with pytest.raises(ConfigError, match="kind"):
        AEConfig(kind="unet")
    with pytest.raises(ConfigError, match="kind"):
        DMLConfig(kind="mlp")
    with pytest.raises(ConfigError, match="widths"):
        AEConfig(widths=(8, 16))
    with pytest.raises(ConfigError, match="width"):
        DMLConfig(width=0)
    with pytest.raises(ConfigError, match="latnet"):
        AEConfig.from_dict({"latnet": 3})


def test_wrong_feature_shape_is_one_line() -> None:
    d = MatchingDiscriminator(DMLConfig(in_channels=6, spatial=2, width=8))
    with pytest.raises(FeatureMismatchError) as info:
        d(torch.randn(3, 5, 2, 2), torch.randn(3, 6, 2, 2))
    msg = str(info.value)
    assert isinstance(info.value, LandlensError) and "\n" not in msg
    assert "(5, 2, 2)" in msg and "(6, 2, 2)" in msg and "24" in msg
    with pytest.raises(FeatureMismatchError, match="25"):
        d(torch.randn(3, 24), torch.randn(3, 25))
    ae = ResidualAutoencoder(AEConfig(widths=TINY, latent_channels=8))
    with pytest.raises(FeatureMismatchError, match="128"):
        ae.encode(torch.rand(1, 3, 128, 128))


# ----------------------------------------------------------------------------- units

def test_dyad_shortcut_types() -> None:
    dyad = ResidualDyad(6, 10)
    a, b = dyad.block_a, dyad.block_b
    assert isinstance(a, PreActBlock) and isinstance(b, PreActDownBlock)
    # block A: identity shortcut with no parameters, stride 1
    assert isinstance(a.shortcut, nn.Identity) and not list(a.shortcut.parameters())
    assert a.conv1.stride == (1, 1) and a.conv1.kernel_size == (3, 3) and a.conv2.kernel_size == (3, 3)
    # block B: H is a 3x3 stride-2 convolution on the shortcut; F's first convolution has stride 2
    assert type(b.shortcut) is nn.Conv2d
    assert b.shortcut.kernel_size == (3, 3) and b.shortcut.stride == (2, 2)
    assert (b.shortcut.in_channels, b.shortcut.out_channels) == (6, 10)
    assert b.conv1.stride == (2, 2) and b.conv2.stride == (1, 1)
    # decoder dyad: the same with stride-2 transposed convolutions in block B
    up = ResidualDyadUp(10, 6)
    assert isinstance(up.block_a.shortcut, nn.Identity) and isinstance(up.block_b, PreActUpBlock)
    assert type(up.block_b.shortcut) is nn.ConvTranspose2d and type(up.block_b.conv1) is nn.ConvTranspose2d
    assert up.block_b.shortcut.kernel_size == (3, 3) and up.block_b.shortcut.stride == (2, 2)
    # plain residual blocks: identity when the shape is kept, a 1x1 projection otherwise
    assert isinstance(PreActResBlock(8, 8, 1).shortcut, nn.Identity)
    proj = PreActResBlock(8, 16, 2).shortcut
    assert type(proj) is nn.Conv2d and proj.kernel_size == (1, 1) and proj.stride == (2, 2)
    tproj = PreActResBlock(16, 8, 2, transpose=True).shortcut
    assert type(tproj) is nn.ConvTranspose2d and tproj.stride == (2, 2)


def test_dyad_equations_numerically() -> None:
    """A(x) - x = F(x) and B(y) = H(y) + F(y), with F and H written out from the parameters."""
    torch.manual_seed(0)
    dyad = randomise_bn(ResidualDyad(6, 10)).eval()
    a, b = dyad.block_a, dyad.block_b
    x = torch.randn(3, 6, 9, 9)
    with torch.no_grad():
        f_a = F.conv2d(bn_relu(F.conv2d(bn_relu(x, a.bn1), a.conv1.weight, padding=1), a.bn2),
                       a.conv2.weight, padding=1)
        assert torch.allclose(a(x) - x, f_a, atol=1e-5)
        y = a(x)
        f_b = F.conv2d(bn_relu(F.conv2d(bn_relu(y, b.bn1), b.conv1.weight, stride=2, padding=1), b.bn2),
                       b.conv2.weight, padding=1)
        h = F.conv2d(y, b.shortcut.weight, stride=2, padding=1)
        out = dyad(x)
        assert out.shape == (3, 10, 5, 5)
        assert torch.allclose(out, h + f_b, atol=1e-5)
        assert float((out - h).abs().max()) > 1e-2  # the residual branch does contribute


def test_up_units_double_the_size() -> None:
    with torch.no_grad():
        assert ResidualDyadUp(8, 4).eval()(torch.randn(2, 8, 5, 5)).shape == (2, 4, 10, 10)
        assert PreActResBlock(8, 4, 2, transpose=True).eval()(torch.randn(2, 8, 5, 5)).shape == (2, 4, 10, 10)
        assert PreActResBlock(8, 4, 2).eval()(torch.randn(2, 8, 10, 10)).shape == (2, 4, 5, 5)


# ----------------------------------------------------------------------------- split first convolution

def test_split_first_conv_equals_concatenated_conv() -> None:
    torch.manual_seed(0)
    c, w, s = 7, 5, 4
    conv = nn.Conv2d(2 * c, w, 3, padding=1)
    d = randomise_bn(MatchingDiscriminator(DMLConfig(in_channels=c, spatial=s, width=w))).eval()
    assert d.first_b.bias is None
    d.from_concat_conv(conv)
    assert torch.equal(d.concat_weight(), conv.weight) and torch.equal(d.concat_bias(), conv.bias)
    a, b = torch.randn(6, c, s, s), torch.randn(6, c, s, s)
    with torch.no_grad():
        ref = conv(torch.cat([a, b], dim=1))
        assert torch.allclose(d.first_a(a) + d.first_b(b), ref, atol=1e-5)
        assert torch.allclose(d(a, b), d.tail(ref), atol=1e-5)
        assert torch.allclose(d(a, b), d.forward_concat(torch.cat([a, b], dim=1)), atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        d.from_concat_conv(nn.Conv2d(2 * c + 1, w, 3, padding=1))


# ----------------------------------------------------------------------------- learning

@pytest.mark.parametrize("kind", ["resdyad", "res"])
def test_tiny_discriminator_overfits_eight_pairs(kind: str) -> None:
    torch.manual_seed(0)
    d = MatchingDiscriminator(DMLConfig(kind=kind, in_channels=4, spatial=2, width=8))
    a, b = torch.randn(8, 4, 2, 2), torch.randn(8, 4, 2, 2)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    opt = torch.optim.SGD(d.parameters(), lr=0.05, momentum=0.9)
    d.eval()
    with torch.no_grad():
        before = F.cross_entropy(d(a, b), y).item()
    d.train()
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(d(a, b), y).backward()
        opt.step()
    d.eval()
    with torch.no_grad():
        logits = d(a, b)
    assert torch.equal(logits.argmax(1), y)
    assert F.cross_entropy(logits, y).item() < 0.1 * before


def test_tiny_autoencoder_reduces_mse() -> None:
    torch.manual_seed(0)
    ae = ResidualAutoencoder(AEConfig(input_size=64, widths=(8, 8, 8), latent_channels=8))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    one = torch.ones_like(xx)
    images = torch.stack([torch.stack([xx, yy, 0.5 * one]), torch.stack([1 - xx, 0.2 * one, yy]),
                          torch.stack([0.8 * one, xx * yy, 1 - yy]),
                          torch.stack([0.3 + 0.4 * yy, 0.7 - 0.4 * xx, 0.1 * one])])
    ae.eval()
    with torch.no_grad():
        before = reconstruction_loss(ae(images)[0], images).item()
    assert before == pytest.approx(F.mse_loss(ae(images)[0], images).item())
    opt = torch.optim.Adam(ae.parameters(), lr=1e-2)
    ae.train()
    for _ in range(40):
        opt.zero_grad()
        reconstruction_loss(ae(images)[0], images).backward()
        opt.step()
    ae.eval()
    with torch.no_grad():
        after = reconstruction_loss(ae(images)[0], images).item()
    assert after < before / 4

"""Losses on log-probabilities: NLL/CE, label smoothing and the improved cross-entropy (ICE)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from landlens.errors import ConfigError
from landlens.training.losses import LOSS_NAMES, build_loss

# Worked example: two images, three classes, probabilities given directly.
#   row 0: p = (0.7, 0.2, 0.1), true class 1 -> predicted 0, wrong
#          CE = -ln 0.2 = 1.6094379124341003, gap = 0.7 - 0.2 = 0.5
#   row 1: p = (0.1, 0.6, 0.3), true class 1 -> predicted 1, right
#          CE = -ln 0.6 = 0.5108256237659907, gap = 0
P = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], dtype=torch.float64)
Y = torch.tensor([1, 1])


def test_ice_worked_example_by_hand():
    logp = P.log()
    # w = 1: ((1.6094379124341003 + 0.5) + 0.5108256237659907) / 2 = 1.3101317680999455
    assert build_loss("ice")(logp, Y).item() == pytest.approx(1.3101317680999455, abs=1e-12)
    # w = 2: ((1.6094379124341003 + 2 * 0.5) + 0.5108256237659907) / 2 = 1.5601317680999455
    assert build_loss("ice", ice_weight=2.0)(logp, Y).item() == pytest.approx(1.5601317680999455, abs=1e-12)
    # w = 0 is plain cross-entropy: (1.6094379124341003 + 0.5108256237659907) / 2
    assert build_loss("ice", ice_weight=0.0)(logp, Y).item() == pytest.approx(1.0601317680999455, abs=1e-12)


def test_ice_gap_is_zero_when_every_prediction_is_right():
    torch.manual_seed(0)
    logits = torch.randn(16, 5, dtype=torch.float64)
    y = logits.argmax(1)
    logp = F.log_softmax(logits, 1)
    for w in (0.5, 1.0, 3.0):
        assert build_loss("ice", ice_weight=w)(logp, y).item() == pytest.approx(F.nll_loss(logp, y).item(), abs=1e-12)
    # and the gap is positive as soon as one prediction is wrong
    y_wrong = y.clone()
    y_wrong[0] = (y[0] + 1) % 5
    p = logp.exp()
    expected_gap = (p[0].max() - p[0, y_wrong[0]]).item() / 16
    diff = build_loss("ice")(logp, y_wrong).item() - F.nll_loss(logp, y_wrong).item()
    assert expected_gap > 0
    assert diff == pytest.approx(expected_gap, abs=1e-12)


def test_ice_gradient_wrt_log_probs_matches_hand_derivation():
    # d loss / d logp[i, k] = (1/B) * (-[k = y_i] + w * (p_max [k = m_i] - p_y [k = y_i])), m_i = argmax
    # row 0 (w = 1): k=0 (argmax): 0.7 ; k=1 (true): -1 - 0.2 = -1.2 ; k=2: 0   -> / 2
    # row 1: argmax == true class, the gap terms cancel: k=1: -1               -> / 2
    logp = P.log().clone().requires_grad_(True)
    build_loss("ice")(logp, Y).backward()
    expected = torch.tensor([[0.35, -0.6, 0.0], [0.0, -0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, atol=1e-12, rtol=0)

    logp2 = P.log().clone().requires_grad_(True)
    build_loss("ice", ice_weight=2.0)(logp2, Y).backward()
    expected2 = torch.tensor([[0.7, -0.7, 0.0], [0.0, -0.5, 0.0]], dtype=torch.float64)  # (1.4, -1.4) / 2
    torch.testing.assert_close(logp2.grad, expected2, atol=1e-12, rtol=0)


def _ice_on_logits(loss, y):
    return lambda z: loss(F.log_softmax(z, 1), y)


def test_ice_gradient_wrt_logits_gradcheck_and_finite_differences():
    torch.manual_seed(1)
    z = (torch.randn(6, 4, dtype=torch.float64) * 1.5).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    loss = build_loss("ice", ice_weight=1.5)
    f = _ice_on_logits(loss, y)
    p = F.softmax(z.detach(), 1)
    assert (p > 1e-6).all() and (p < 1 - 1e-6).all()  # no clipping, no ties at this point
    assert (z.detach().argmax(1) != y).any()  # the gap term is active for some rows
    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)

    # an independent central finite-difference reference
    (grad,) = torch.autograd.grad(f(z), z)
    h = 1e-6
    fd = torch.zeros_like(z)
    with torch.no_grad():
        for i in range(z.shape[0]):
            for j in range(z.shape[1]):
                zp, zm = z.detach().clone(), z.detach().clone()
                zp[i, j] += h
                zm[i, j] -= h
                fd[i, j] = (f(zp) - f(zm)) / (2 * h)
    torch.testing.assert_close(grad, fd, atol=1e-7, rtol=1e-6)

    # and the chain rule through log-softmax applied to the hand formula on log-probs
    b = z.shape[0]
    m = p.argmax(1)
    g_logp = torch.zeros_like(p)
    rows = torch.arange(b)
    g_logp[rows, y] += -1.0 - 1.5 * p[rows, y]
    g_logp[rows, m] += 1.5 * p[rows, m]
    g_logp /= b
    g_z = g_logp - p * g_logp.sum(1, keepdim=True)
    torch.testing.assert_close(grad, g_z, atol=1e-12, rtol=0)


def test_ice_clipping_at_probability_one():
    eps = 1e-7
    z = torch.tensor([[100.0, 0.0, 0.0], [100.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    logp = F.log_softmax(z, 1)
    assert logp.exp()[0, 0].item() == 1.0  # exactly one before clipping
    loss = build_loss("ice", eps=eps)
    # right and certain: -log(1 - eps), gap 0; not exactly zero because of the clip
    right = loss(logp[:1], torch.tensor([0]))
    assert right.item() == pytest.approx(-math.log1p(-eps), rel=1e-9)
    assert right.item() > 0
    # wrong and certain: p_true = e^-100 is clipped up to eps: -log(eps) + (1 - eps) - eps
    wrong = loss(logp[1:], torch.tensor([1]))
    assert wrong.item() == pytest.approx(-math.log(eps) + (1 - eps) - eps, rel=1e-12)
    assert math.isfinite(wrong.item())
    # every probability is clipped, so no gradient flows and nothing is NaN
    (g,) = torch.autograd.grad(right + wrong, z)
    assert torch.isfinite(g).all()
    assert torch.count_nonzero(g) == 0
    # a larger eps moves the values as the formula says
    big = build_loss("ice", eps=1e-3)(logp[1:], torch.tensor([1]))
    assert big.item() == pytest.approx(-math.log(1e-3) + (1 - 1e-3) - 1e-3, rel=1e-12)


@pytest.mark.parametrize("name", ["nll", "ce"])
def test_nll_and_ce_equal_torch_cross_entropy_on_logits(name):
    torch.manual_seed(2)
    logits = torch.randn(10, 7) * 3
    y = torch.randint(0, 7, (10,))
    got = build_loss(name)(F.log_softmax(logits, 1), y)
    torch.testing.assert_close(got, F.cross_entropy(logits, y), atol=1e-6, rtol=1e-6)
    # and by hand: mean of -log softmax at the true class
    manual = -(logits.softmax(1)[torch.arange(10), y]).log().mean()
    torch.testing.assert_close(got, manual, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("s", [0.0, 0.1, 0.25, 0.9])
def test_label_smoothing_equals_torch(s):
    torch.manual_seed(3)
    logits = torch.randn(12, 5, dtype=torch.float64) * 2
    y = torch.randint(0, 5, (12,))
    got = build_loss("label_smoothing", smoothing=s)(F.log_softmax(logits, 1), y)
    ref = F.cross_entropy(logits, y, label_smoothing=s)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def test_label_smoothing_worked_example():
    # p = (0.7, 0.2, 0.1), y = 1, s = 0.3: q = (0.1, 0.8, 0.1)
    # loss = -(0.1 ln 0.7 + 0.8 ln 0.2 + 0.1 ln 0.1)
    logp = P[:1].log()
    expected = -(0.1 * math.log(0.7) + 0.8 * math.log(0.2) + 0.1 * math.log(0.1))
    assert build_loss("label_smoothing", smoothing=0.3)(logp, Y[:1]).item() == pytest.approx(expected, abs=1e-12)


def test_build_loss_errors():
    assert set(LOSS_NAMES) == {"nll", "ce", "label_smoothing", "ice"}
    with pytest.raises(ConfigError, match="unknown loss 'focal'.*nll, ce, label_smoothing, ice"):
        build_loss("focal")
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="smoothing"):
            build_loss("label_smoothing", smoothing=bad)
    for bad in (0.0, -1e-7, 0.5, float("inf")):
        with pytest.raises(ConfigError, match="eps"):
            build_loss("ice", eps=bad)
    with pytest.raises(ConfigError, match="weight"):
        build_loss("ice", ice_weight=-1.0)
    # settings a loss does not use are not checked
    assert isinstance(build_loss("nll", smoothing=5.0), torch.nn.Module)
    assert build_loss("label-smoothing", smoothing=0.2).smoothing == 0.2


def test_shape_mismatch_is_a_bug_not_a_config_error():
    with pytest.raises(ValueError, match="log-probabilities"):
        build_loss("ice")(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))

"""Classification heads: log-probability outputs, the squeeze-and-excitation head, bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from landlens.errors import ConfigError
from landlens.models.heads import HEAD_KINDS, LinearHead, MLPHead, SEHead, build_head


def _z(b: int = 6, c: int = 32, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(b, c, dtype=torch.float64)


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_outputs_are_log_probabilities(kind, dropout):
    torch.manual_seed(1)
    head = build_head(32, 5, kind, dropout=dropout, hidden=16, reduction=4).double()
    for train in (False, True):
        head.train(train)
        out = head(_z())
        assert out.shape == (6, 5)
        assert (out <= 0).all()
        torch.testing.assert_close(out.exp().sum(1), torch.ones(6, dtype=torch.float64), atol=1e-12, rtol=0)
        # log-softmax is idempotent: re-normalising changes nothing
        torch.testing.assert_close(torch.log_softmax(out, 1), out, atol=1e-12, rtol=0)


def test_build_head_types_and_sizes():
    assert isinstance(build_head(32, 5, "linear"), LinearHead)
    mlp = build_head(32, 5, "mlp", hidden=16)
    assert isinstance(mlp, MLPHead) and mlp.hidden[0].weight.shape == (16, 32) and mlp.fc.weight.shape == (5, 16)
    se = build_head(32, 5, "se", reduction=4)
    assert isinstance(se, SEHead)
    assert se.excite[0].weight.shape == (8, 32) and se.excite[2].weight.shape == (32, 8)
    assert build_head(3, 2, "se", reduction=16).excite[0].weight.shape == (1, 3)  # at least one unit
    assert build_head(32, 5, "linear", dropout=np.float64(0.2)).dropout.p == pytest.approx(0.2)
    assert build_head(32, 5, "mlp", hidden=np.int64(8)).fc.weight.shape == (5, 8)


def test_linear_head_equals_manual_computation():
    torch.manual_seed(2)
    head = build_head(32, 5, "linear", dropout=0.5).double().eval()
    z = _z()
    w, b = head.fc.weight.detach().numpy(), head.fc.bias.detach().numpy()
    logits = z.numpy() @ w.T + b
    expected = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(head(z).detach().numpy(), expected, atol=1e-12)


def test_se_attention_and_forward_equal_manual_computation():
    torch.manual_seed(3)
    head = build_head(32, 5, "se", reduction=4, dropout=0.2).double().eval()
    z = _z()
    w1, b1 = head.excite[0].weight.detach().numpy(), head.excite[0].bias.detach().numpy()
    w2, b2 = head.excite[2].weight.detach().numpy(), head.excite[2].bias.detach().numpy()
    wf, bf = head.fc.weight.detach().numpy(), head.fc.bias.detach().numpy()
    zn = z.numpy()
    # SE-Net Eq. 3: s = sigmoid(W2 relu(W1 z))
    s = 1.0 / (1.0 + np.exp(-(np.maximum(zn @ w1.T + b1, 0.0) @ w2.T + b2)))
    att = head.attention(z).detach().numpy()
    assert att.shape == (6, 32)
    assert ((att > 0) & (att < 1)).all()
    np.testing.assert_allclose(att, s, atol=1e-12)
    # Eq. 4: z' = s * z, then the classifier and log-softmax
    logits = (zn * s) @ wf.T + bf
    expected = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(head(z).detach().numpy(), expected, atol=1e-12)
    # the input is not modified in place by the ReLU inside the excitation
    torch.testing.assert_close(z, _z())


def test_mlp_head_equals_manual_computation_in_eval():
    torch.manual_seed(4)
    head = build_head(32, 5, "mlp", hidden=8, dropout=0.5).double()
    bn = head.hidden[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    head.eval()
    z = _z().numpy()
    lin = head.hidden[0]
    h = z @ lin.weight.detach().numpy().T + lin.bias.detach().numpy()
    h = (h - bn.running_mean.numpy()) / np.sqrt(bn.running_var.numpy() + bn.eps)
    h = np.maximum(h * bn.weight.detach().numpy() + bn.bias.detach().numpy(), 0.0)
    logits = h @ head.fc.weight.detach().numpy().T + head.fc.bias.detach().numpy()
    expected = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(head(torch.from_numpy(z)).detach().numpy(), expected, atol=1e-12)


def test_dropout_is_active_only_in_training():
    torch.manual_seed(5)
    head = build_head(32, 5, "se", dropout=0.5).double()
    z = _z()
    head.eval()
    torch.testing.assert_close(head(z), head(z))
    head.train()
    assert not torch.equal(head(z), head(z))
    assert isinstance(build_head(32, 5, "linear", dropout=0.0).dropout, nn.Identity)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "attention"}, r"unknown head 'attention'; choose one of linear, mlp, se"),
        ({"kind": "linear", "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"kind": "linear", "dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"kind": "se", "dropout": float("nan")}, r"dropout must be in \[0, 1\)"),
        ({"kind": "linear", "dropout": "0.5"}, r"head dropout must be a number"),
        ({"kind": "mlp", "hidden": 0}, r"hidden width must be positive"),
        ({"kind": "mlp", "hidden": 2.5}, r"hidden width must be a whole number"),
        ({"kind": "se", "reduction": 0}, r"reduction must be positive"),
        ({"kind": "se", "reduction": None}, r"reduction must be a number"),
    ],
)
def test_bad_settings_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_head(32, 5, **kwargs)


def test_bad_sizes_raise_config_error():
    with pytest.raises(ConfigError, match="at least 2 classes"):
        build_head(32, 1)
    with pytest.raises(ConfigError, match="in_features > 0"):
        build_head(0, 5)
    # settings a head does not use are not checked
    assert isinstance(build_head(32, 5, "linear", hidden=-1, reduction=0), LinearHead)

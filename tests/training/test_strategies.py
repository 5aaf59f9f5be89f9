"""Transfer strategies: backbone stages, freezing, frozen BatchNorm, optimiser parameter groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from landlens.errors import ConfigError
from landlens.models.classifier import HeadConfig, build_classifier
from landlens.models.registry import build_body, get_spec, list_backbones
from landlens.training.strategies import (
    apply_strategy,
    backbone_stages,
    freeze_batchnorm_eval,
    param_groups,
)

CLASSES = ["a", "b", "c"]

# The stages of each tested backbone, written out from the architectures (module paths in the body).
EXPECTED_STAGES = {
    "resnet18": ["conv1+bn1", "layer1", "layer2", "layer3", "layer4"],
    "tf_efficientnet_lite0": ["conv_stem+bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4",
                              "blocks.5", "blocks.6+conv_head+bn2"],
    "tv_mobilenet_v2": ["features.0", "features.1", "features.2-3", "features.4-6", "features.7-10",
                        "features.11-13", "features.14-16", "features.17-18"],
    "tv_squeezenet1_1": ["features.0", "features.3", "features.4", "features.6", "features.7", "features.9",
                         "features.10", "features.11", "features.12"],
    "geoembed_v3": ["stem", "layer1", "layer2", "layer3", "layer4", "fc"],
}
# The body modules that must train under `partial` with N = 1 and N = 2, by hand.
LAST_MODULES = {
    "resnet18": (["layer4"], ["layer3", "layer4"]),
    "tf_efficientnet_lite0": (["blocks.6", "conv_head", "bn2"], ["blocks.5", "blocks.6", "conv_head", "bn2"]),
    "tv_mobilenet_v2": (["features.17", "features.18"],
                        ["features.14", "features.15", "features.16", "features.17", "features.18"]),
    "tv_squeezenet1_1": (["features.12"], ["features.11", "features.12"]),
    "geoembed_v3": (["fc"], ["layer4", "fc"]),
}
NAMES = list(EXPECTED_STAGES)
HAS_BN = {"resnet18", "tf_efficientnet_lite0", "tv_mobilenet_v2", "geoembed_v3"}


def _model(name: str, head: str = "linear"):
    torch.manual_seed(0)
    return build_classifier(name, CLASSES, HeadConfig(kind=head), weights="none", verify=False)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _module_numel(model, paths) -> int:
    return sum(_numel(model.backbone.body.get_submodule(p)) for p in paths)


def _under(name: str, paths) -> bool:
    return any(name.startswith(f"body.{p}.") for p in paths)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _step(model, lr: float = 0.1, seed: int = 0) -> None:
    """One SGD step on a random batch (model already in the mode under test)."""
    torch.manual_seed(seed)
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([0, 1, 2, 0])
    opt = torch.optim.SGD(param_groups(model, lr=lr), lr=lr)
    opt.zero_grad()
    F.nll_loss(model(x), y).backward()
    opt.step()


# --------------------------------------------------------------------------- stages


@pytest.mark.parametrize("name", NAMES)
def test_stages_are_ordered_and_cover_each_parameter_once(name):
    model = _model(name)
    stages = backbone_stages(model.backbone)
    assert [s.name for s in stages] == EXPECTED_STAGES[name]
    listed = [p for s in stages for p in s.parameters]
    all_names = [n for n, _ in model.backbone.named_parameters()]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(all_names)
    assert all(s.parameters for s in stages)
    # stages follow the forward order: the first stage holds the first convolution, which sees 3 channels
    first = dict(model.backbone.named_parameters())[stages[0].parameters[0]]
    assert first.ndim == 4 and first.shape[1] == 3


# every named backbone of the registry (the two VGGs and NASNet-A are big but go through the
# same timm path as the others)
ALL = [s.name for s in list_backbones()
       if s.name not in ("vgg16", "vgg19", "nasnetalarge") and s.family != "handcrafted"]  # no parameters


@pytest.mark.parametrize("name", ALL)
def test_every_registry_family_is_partitioned(name):
    body, _ = build_body(get_spec(name))
    stages = backbone_stages(body)
    listed = [p for s in stages for p in s.parameters]
    assert len(listed) == len(set(listed))
    assert set(listed) == {n for n, _ in body.named_parameters()}
    assert len(stages) >= 4
    assert len({s.name for s in stages}) == len(stages)


def test_torchvision_and_landlens_stage_names():
    expected = {
        "tv_googlenet": ["conv1", "conv2", "conv3", "inception3a", "inception3b", "inception4a", "inception4b",
                         "inception4c", "inception4d", "inception4e", "inception5a", "inception5b"],
        "tv_alexnet": ["features.0", "features.3", "features.6", "features.8", "features.10",
                       "classifier.1", "classifier.4"],
    }
    for name, names in expected.items():
        body, _ = build_body(get_spec(name))
        assert [s.name for s in backbone_stages(body)] == names


def test_unknown_network_falls_back_to_children():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))
    stages = backbone_stages(net)
    assert [(s.name, s.parameters) for s in stages] == [
        ("0", ("0.weight", "0.bias")), ("2", ("2.weight", "2.bias")), ("3", ("3.weight", "3.bias"))]


# --------------------------------------------------------------------------- strategies


@pytest.mark.parametrize("name", NAMES)
def test_each_strategy_freezes_what_it_says(name):
    model = _model(name)
    total = _numel(model)
    head = _numel(model.head)
    backbone = _numel(model.backbone)
    assert total == head + backbone

    rep = apply_strategy(model, "linear")
    assert rep.trainable_params == head and rep.frozen_params == backbone and rep.head_params == head
    assert rep.trainable_stages == [] and rep.unfreeze_stages == 0
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())

    for n, paths in enumerate(LAST_MODULES[name], start=1):
        rep = apply_strategy(model, "partial", unfreeze_stages=n)
        expected = _module_numel(model, paths)
        assert rep.trainable_params == head + expected
        assert rep.frozen_params == backbone - expected
        assert rep.trainable_stages == EXPECTED_STAGES[name][-n:]
        for pname, p in model.backbone.named_parameters():
            assert p.requires_grad == _under(pname, paths), pname
        assert all(p.requires_grad for p in model.head.parameters())

    rep = apply_strategy(model, "full")
    assert rep.trainable_params == total and rep.frozen_params == 0
    assert rep.trainable_stages == EXPECTED_STAGES[name]
    assert all(p.requires_grad for p in model.parameters())
    d = rep.to_dict()
    assert d["strategy"] == "full" and d["num_stages"] == len(EXPECTED_STAGES[name])
    assert d["trainable_params"] == total


def test_strategy_errors():
    model = _model("geoembed_v3")
    with pytest.raises(ConfigError, match="unknown transfer strategy 'freeze'.*linear, partial, full"):
        apply_strategy(model, "freeze")
    with pytest.raises(ConfigError, match="unfreeze_stages >= 1"):
        apply_strategy(model, "partial", unfreeze_stages=0)
    with pytest.raises(ConfigError, match="unfreeze_stages=7.*'geoembed_v3' has only 6 stages"):
        apply_strategy(model, "partial", unfreeze_stages=7)
    # N = number of stages is the same as full
    assert apply_strategy(model, "partial", unfreeze_stages=6).frozen_params == 0


@pytest.mark.parametrize("name", NAMES)
def test_linear_training_step_leaves_backbone_bit_identical(name):
    model = _model(name)
    apply_strategy(model, "linear")
    model.train()
    frozen_bn = freeze_batchnorm_eval(model)
    bns = [n for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(frozen_bn) == sorted(f"backbone.{n}" for n in bns)
    assert (len(bns) > 0) == (name in HAS_BN)
    before = _snapshot(model)
    _step(model)
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("backbone."):
            assert torch.equal(v, after[k]), k  # weights AND running_mean/var/num_batches_tracked
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])
    assert not torch.equal(before["head.fc.bias"], after["head.fc.bias"])
    assert all(p.grad is None for p in model.backbone.parameters())


@pytest.mark.parametrize("name", sorted(HAS_BN))
def test_without_freezing_batchnorm_the_running_stats_would_move(name):
    # the control for the test above: frozen parameters alone do not keep BatchNorm still
    model = _model(name)
    apply_strategy(model, "linear")
    model.train()
    before = _snapshot(model)
    _step(model)
    after = model.state_dict()
    moved = [k for k in before if k.startswith("backbone.") and k.endswith("running_mean")
             and not torch.equal(before[k], after[k])]
    assert moved
    assert all(torch.equal(v, after[k]) for k, v in before.items()
               if k.startswith("backbone.") and k.endswith(("weight", "bias")))


@pytest.mark.parametrize("name", NAMES)
def test_partial_one_stage_changes_only_the_last_stage(name):
    model = _model(name)
    apply_strategy(model, "partial", unfreeze_stages=1)
    model.train()
    frozen_bn = freeze_batchnorm_eval(model)
    last = LAST_MODULES[name][0]
    for n, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            in_last = any(n.startswith(f"backbone.body.{p}") for p in last)
            assert m.training == in_last, n
            assert (n in frozen_bn) == (not in_last), n
    before = _snapshot(model)
    _step(model)
    after = model.state_dict()
    changed_last = 0
    for k, v in before.items():
        if not k.startswith("backbone."):
            continue
        in_last = _under(k[len("backbone."):], last)
        if not in_last:
            assert torch.equal(v, after[k]), k
        elif k.endswith("weight") and not torch.equal(v, after[k]):
            changed_last += 1
    assert changed_last >= 1
    # every weight of the last stage that received a non-zero gradient moved
    for pname, p in model.backbone.named_parameters():
        if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(before["backbone." + pname], p.detach()), pname
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])


def test_full_strategy_keeps_batchnorm_training():
    model = _model("resnet18")
    apply_strategy(model, "full")
    model.train()
    assert freeze_batchnorm_eval(model) == []
    assert all(m.training for m in model.modules())


def test_batchnorm_without_affine_follows_its_parent():
    net = nn.Module()
    net.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))
    net.head = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False))
    for p in net.backbone.parameters():
        p.requires_grad_(False)
    net.train()
    assert freeze_batchnorm_eval(net) == ["backbone.1"]
    assert not net.backbone[1].training and net.head[1].training


# --------------------------------------------------------------------------- parameter groups


def test_param_groups_learning_rates_and_weight_decay():
    model = _model("resnet18", head="mlp")
    apply_strategy(model, "partial", unfreeze_stages=1)
    groups = param_groups(model, lr=0.01, backbone_lr_mult=0.1, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    assert by_name["head"]["lr"] == 0.01 and by_name["head_no_decay"]["lr"] == 0.01
    assert by_name["backbone"]["lr"] == pytest.approx(0.001) and by_name["backbone_no_decay"]["lr"] == pytest.approx(0.001)
    assert by_name["head"]["weight_decay"] == 1e-4 and by_name["backbone"]["weight_decay"] == 1e-4
    assert by_name["head_no_decay"]["weight_decay"] == 0.0 and by_name["backbone_no_decay"]["weight_decay"] == 0.0

    ids = {k: {id(p) for p in g["params"]} for k, g in by_name.items()}
    named = dict(model.named_parameters())
    # by hand: the MLP head is Linear(512, 512) - BatchNorm1d - ReLU - Dropout - Linear(512, 3)
    assert ids["head"] == {id(named["head.hidden.0.weight"]), id(named["head.fc.weight"])}
    assert ids["head_no_decay"] == {id(named[n]) for n in ("head.hidden.0.bias", "head.hidden.1.weight",
                                                            "head.hidden.1.bias", "head.fc.bias")}
    layer4 = {n: p for n, p in named.items() if n.startswith("backbone.body.layer4.")}
    convs = {id(p) for n, p in layer4.items() if p.ndim == 4}
    bn = {id(p) for n, p in layer4.items() if ".bn" in n or ".downsample.1." in n}
    assert ids["backbone"] == convs
    assert ids["backbone_no_decay"] == bn
    assert len(convs) + len(bn) == len(layer4)
    # frozen parameters are in no group; every trainable one is in exactly one
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    torch.optim.AdamW(groups)  # the groups are valid optimiser input


def test_param_groups_linear_has_no_backbone_group_and_checks_values():
    model = _model("tv_squeezenet1_1")
    apply_strategy(model, "linear")
    groups = param_groups(model, lr=0.5, backbone_lr_mult=10.0)
    assert [g["name"] for g in groups] == ["head", "head_no_decay"]
    assert [g["lr"] for g in groups] == [0.5, 0.5]
    assert sum(p.numel() for g in groups for p in g["params"]) == _numel(model.head)
    apply_strategy(model, "full")
    groups = param_groups(model, lr=0.5, backbone_lr_mult=0.2)
    assert {g["name"]: g["lr"] for g in groups}["backbone"] == pytest.approx(0.1)
    for kwargs in ({"lr": 0.0}, {"lr": float("nan")}, {"lr": 0.1, "backbone_lr_mult": 0.0},
                   {"lr": 0.1, "weight_decay": -1.0}):
        with pytest.raises(ConfigError):
            param_groups(model, **kwargs)

"""Staged unfreezing, model side: schedule parsing, layer groups, frozen BN, param groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from dist_train.errors import UserError
from dist_train.model.stages import (
    Stage,
    apply_trainable,
    count_params,
    freeze_bn,
    layer_groups,
    param_groups,
    parse_schedule,
    stage_epochs,
    stage_for_epoch,
    stage_start_epoch,
    trainable_names,
)
from dist_train.tasks import build_model as create_model  # timm models, and the heads tasks add

FAMILIES = {
    "resnet18": ("conv1.weight", {"fc.weight", "fc.bias"}),
    "efficientnet_b0": ("conv_stem.weight", {"classifier.weight", "classifier.bias"}),
    "convnext_atto": ("stem.0.weight", {"head.fc.weight", "head.fc.bias"}),  # head.norm: with stages.3
    "vit_tiny_patch16_224": ("cls_token", {"head.weight", "head.bias"}),
}


def _model(name: str, head: str = "single", num_classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, 18 if head == "multi" else num_classes, img_size=32, head=head)


# ----------------------------------------------------------------------------- schedule
def test_parse_schedule_string_and_yaml_forms() -> None:
    want = [Stage("head", 1), Stage("last2", 2), Stage("all", None)]
    assert parse_schedule("head:1,last2:2,all") == want
    assert parse_schedule(" head:1 , LAST2:2 , all ") == want
    assert parse_schedule([{"train": "head", "epochs": 1}, {"train": "last2", "epochs": 2}, {"train": "all"}]) == want
    assert parse_schedule(None) == [Stage("all")]
    assert parse_schedule("") == [Stage("all")]
    assert parse_schedule("head") == [Stage("head")]
    assert parse_schedule("last3:2,all:4") == [Stage("last3", 2), Stage("all", 4)]


@pytest.mark.parametrize("spec", [
    "foo:1", "head:0", "head:x", "head:", "head,all", "all:1,head", "head:1,head", "last2:1,last1",
    "last0:1,all", "head:-1,all", [{"train": "head", "epochs": 1, "lr": 3}], [{"epochs": 1}], ["head"], 5, [],
])
def test_parse_schedule_rejects(spec) -> None:
    with pytest.raises(UserError):
        parse_schedule(spec)


def test_stage_for_epoch_and_start() -> None:
    stages = parse_schedule("head:1,last2:2,all")
    assert [stage_for_epoch(stages, e, 6) for e in range(6)] == [0, 1, 1, 2, 2, 2]
    assert stage_epochs(stages, 6) == [1, 2, 3]
    assert [stage_start_epoch(stages, i, 6) for i in range(3)] == [0, 1, 3]
    assert stage_for_epoch(parse_schedule("head"), 7, 8) == 0
    with pytest.raises(UserError, match="leaving none"):
        stage_for_epoch(stages, 0, 3)
    with pytest.raises(UserError, match="add up to 5"):
        stage_epochs(parse_schedule("head:1,all:4"), 6)
    assert stage_epochs(parse_schedule("head:1,all:4"), 5) == [1, 4]


# ----------------------------------------------------------------------------- groups
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_layer_groups_partition_stem_to_head(name: str) -> None:
    stem_param, head = FAMILIES[name]
    model = _model(name)
    groups = layer_groups(model)
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters())
    assert len(flat) == len(set(flat))
    assert len(groups) >= 4
    assert stem_param in groups[0]
    assert set(groups[-1]) == head
    assert trainable_names(model, "head") == head
    assert trainable_names(model, "all") == set(flat)
    assert trainable_names(model, "last2") == set(groups[-1]) | set(groups[-2]) | set(groups[-3])
    assert trainable_names(model, "last999") == set(flat)


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_layer_groups_multi_head_delegates_to_backbone(name: str) -> None:
    model = _model(name, head="multi")
    groups = layer_groups(model)
    backbone = layer_groups(model.backbone)
    heads = {f"{h}_head.{p}" for h in ("mask", "gender", "age") for p in ("weight", "bias")}
    assert set(groups[-1]) == heads
    assert [[f"backbone.{n}" for n in g] for g in backbone] == groups[:-1]
    assert trainable_names(model, "head") == heads
    assert count_params(model, heads) == (3 + 2 + 3) * (model.num_features + 1)


# Layers timm's matchers leave unnamed between the last block and the classifier (they come with
# the pretrained weights): ConvNeXt's head norm, a ViT's fc_norm, MobileNetV3's conv_head,
# MobileNetV4's conv_head + BatchNorm.
PRE_LOGITS = {
    "test_convnext": ({"head.norm.weight", "head.norm.bias"}, "stages.3"),
    "test_vit2": ({"fc_norm.weight", "fc_norm.bias"}, "blocks.7"),
    "mobilenetv3_small_050": ({"conv_head.weight", "conv_head.bias"}, "blocks.5"),
    "mobilenetv4_conv_small_035": ({"conv_head.weight", "norm_head.weight", "norm_head.bias"}, "blocks.4"),
}


@pytest.mark.parametrize("name", sorted(PRE_LOGITS))
def test_head_is_the_classifier_alone(name: str) -> None:
    """`--unfreeze head` trains the new classifier only: the pre-logits layers join the last block
    group (they stayed in the head group, up to 69% of a MobileNetV4's parameters, its BatchNorm
    statistics moving), stay bit-identical in the head stage, and the multi-head model groups its
    backbone the same way."""
    pre, last_block = PRE_LOGITS[name]
    model = _model(name)
    clf = {f"{n}.{p}" for n, m in model.named_modules() if m is model.get_classifier() for p in ("weight", "bias")}
    groups = layer_groups(model)
    assert trainable_names(model, "head") == set(groups[-1]) == clf
    assert pre <= set(groups[-2]) and any(n.startswith(last_block + ".") for n in groups[-2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model, clf)
    after = model.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == clf
    multi = _model(name, head="multi")
    assert layer_groups(multi)[:-1] == [[f"backbone.{n}" for n in g] for g in groups[:-1]]


def test_resnet_last_groups_are_layers() -> None:
    model = _model("resnet18")
    last1 = trainable_names(model, "last1")
    assert {n.split(".")[0] for n in last1} == {"fc", "layer4"}
    assert {n.split(".")[0] for n in trainable_names(model, "last2")} == {"fc", "layer4", "layer3"}


# ----------------------------------------------------------------------------- freezing
def _train_steps(model: torch.nn.Module, names: set[str], steps: int = 3, train_bn: bool = False,
                 use_freeze_bn: bool = True) -> None:
    apply_trainable(model, names, train_bn=train_bn)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = create_optimizer_v2(param_groups(model, trainable, weight_decay=0.05), opt="sgd", lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model.train()
        if use_freeze_bn:
            freeze_bn(model, names, train_bn)
        x = torch.randn(4, 3, 32, 32, generator=g) * 3 + 1
        y = torch.randint(0, 5, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_head_stage_keeps_frozen_params_and_bn_stats(name: str) -> None:
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = trainable_names(model, "head")
    _train_steps(model, head)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == head  # every other param and every BN running stat is bit-identical
    assert all(p.requires_grad == (n in head) for n, p in model.named_parameters())


def test_without_freeze_bn_running_stats_move() -> None:
    model = _model("resnet18")
    before = model.layer1[0].bn1.running_mean.clone()
    _train_steps(model, trainable_names(model, "head"), use_freeze_bn=False)
    assert not torch.equal(before, model.layer1[0].bn1.running_mean)


def test_train_bn_keeps_bn_trainable() -> None:
    model = _model("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = trainable_names(model, "head")
    _train_steps(model, head, train_bn=True)
    assert model.layer1[0].bn1.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad
    assert not torch.equal(before["layer1.0.bn1.running_mean"], model.layer1[0].bn1.running_mean)
    assert not torch.equal(before["layer1.0.bn1.weight"], model.layer1[0].bn1.weight)
    assert torch.equal(before["layer1.0.conv1.weight"], model.layer1[0].conv1.weight)


def test_freeze_bn_in_last_stage_only_frozen_layers() -> None:
    model = _model("resnet18")
    names = trainable_names(model, "last1")
    model.train()
    n = freeze_bn(model, names)
    assert not model.layer1[0].bn1.training and model.layer4[0].bn1.training
    assert n == sum(1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and not m.training)
    model.train()
    assert freeze_bn(model, trainable_names(model, "all")) == 0


# ----------------------------------------------------------------------------- param groups
def test_param_groups_weight_decay_and_layer_decay() -> None:
    model = _model("vit_tiny_patch16_224")
    groups = layer_groups(model)
    pg = param_groups(model, trainable_names(model, "all"), weight_decay=0.05, layer_decay=0.5)
    by_name = {n: g for g in pg for n in g["param_names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    for g in pg:
        assert len(g["params"]) == len(g["param_names"]) and g["group_name"]
    assert by_name["head.weight"]["lr_scale"] == 1.0 and by_name["head.weight"]["weight_decay"] == 0.05
    assert by_name["head.bias"]["weight_decay"] == 0.0
    assert by_name["pos_embed"]["weight_decay"] == 0.0  # ViT's no_weight_decay()
    assert by_name["blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert by_name["pos_embed"]["lr_scale"] == 0.5 ** (len(groups) - 1)
    assert by_name["blocks.11.attn.qkv.weight"]["lr_scale"] == 0.5
    plain = param_groups(model, {"head.weight", "head.bias"}, weight_decay=0.05)
    assert [g["lr_scale"] for g in plain] == [1.0, 1.0]
    assert sorted(n for g in plain for n in g["param_names"]) == ["head.bias", "head.weight"]
    with pytest.raises(ValueError):
        param_groups(model, {"nope"}, weight_decay=0.0)


def test_timm_scheduler_applies_lr_scale() -> None:
    model = _model("resnet18")
    pg = param_groups(model, trainable_names(model, "all"), weight_decay=0.0, layer_decay=0.5)
    opt = create_optimizer_v2(pg, opt="adamw", lr=1e-3, weight_decay=0.0)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=1, step_on_epochs=False, updates_per_epoch=10)
    sched.step_update(0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])


@pytest.mark.parametrize("opt_name,state_key", [("adamw", "exp_avg"), ("sgd", "momentum_buffer")])
def test_optimizer_extension_keeps_state(opt_name: str, state_key: str) -> None:
    model = _model("resnet18")
    head = trainable_names(model, "head")
    kw = {"momentum": 0.9} if opt_name == "sgd" else {}
    opt = create_optimizer_v2(param_groups(model, head, weight_decay=0.05, layer_decay=0.8), opt=opt_name, lr=0.01,
                              weight_decay=0.05, **kw)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))

    def step() -> None:
        model.train()
        freeze_bn(model, names)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    names = head
    apply_trainable(model, names)
    step()
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p in opt.state} == head  # frozen params: no state
    kept = {n: opt.state[params[n]][state_key].clone() for n in head}

    names = trainable_names(model, "last1")
    apply_trainable(model, names)
    n_groups = len(opt.param_groups)
    for g in param_groups(model, names - head, weight_decay=0.05, layer_decay=0.8):
        opt.add_param_group(g)
    assert len(opt.param_groups) > n_groups
    for n in head:  # adding groups leaves the existing state alone
        assert torch.equal(opt.state[params[n]][state_key], kept[n])
    step()
    assert {n for n, p in params.items() if p in opt.state} == names
    assert all(not torch.equal(opt.state[params[n]][state_key], kept[n]) for n in head)
    scales = {g["group_name"]: g["lr_scale"] for g in opt.param_groups}
    assert scales["layer_5_decay"] == 1.0 and scales["layer_4_decay"] == pytest.approx(0.8)
    opt.load_state_dict(opt.state_dict())  # param_names survive a round trip


def test_count_params() -> None:
    model = _model("resnet18")
    total = sum(p.numel() for p in model.parameters())
    assert count_params(model) == total
    assert count_params(model, {"fc.weight", "fc.bias"}) == 512 * 5 + 5
    wrapped = torch.nn.Module()
    wrapped.module = model  # how DDP names parameters
    assert count_params(wrapped, {"fc.weight", "fc.bias"}) == 512 * 5 + 5


@pytest.mark.parametrize("opt_name,fused", [("adamw", True), ("sgd", True), ("lamb", None)])
def test_trainer_optimizer_uses_fused_kernels_where_torch_has_them(opt_name, fused):
    """train.optim.build_optimizer: torch's fused kernels on CPU as on CUDA (50 -> 6.6 ms per resnet18
    AdamW step on one CPU thread); timm's own optimizers (lamb) get no `fused` argument."""
    from dist_train.config import Config
    from dist_train.train.optim import build_optimizer

    model = create_model("test_resnet", 4)
    cfg = Config.from_flat(dict(data="unused", model="test_resnet", opt=opt_name))
    opt = build_optimizer(cfg.optim, cfg.stages, model)
    assert opt.defaults.get("fused") is fused
    sum(p.sum() for p in model.parameters()).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # the fused kernel runs here (CPU)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))

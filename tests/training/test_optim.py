"""Parameter groups and the warmup + poly schedule of the paper's recipe."""

import pytest
import torch
from torch import nn

from segformer import SegFormer
from segformer.errors import ConfigError
from segformer.training.optim import build_adamw, build_poly_schedule, param_groups, warmup_poly_factor


@pytest.fixture(scope="module")
def model() -> SegFormer:
    return SegFormer("b0", num_classes=5)


def _groups_by_param(groups):
    return {id(p): group for group in groups for p in group["params"]}


def test_every_trainable_parameter_lands_in_exactly_one_group(model):
    groups = param_groups(model, lr=1e-3, weight_decay=0.01)
    ids = [id(p) for group in groups for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert [g["name"] for g in groups] == ["encoder", "encoder_norm", "head", "head_norm"]


def test_head_gets_lr_mult_and_norm_layers_get_no_weight_decay(model):
    groups = param_groups(model, lr=1e-3, weight_decay=0.01, head_lr_mult=10.0, norm_weight_decay=0.0)
    by_param = _groups_by_param(groups)
    names = dict(model.named_parameters())
    norm_names = {
        f"{module_name}.{param_name}"
        for module_name, module in model.named_modules()
        if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d))
        for param_name, _ in module.named_parameters(recurse=False)
    }
    assert "decode_head.bn.weight" in norm_names and len(norm_names) > 20
    for name, param in names.items():
        group = by_param[id(param)]
        in_head = name.startswith("decode_head.")
        assert group["lr"] == pytest.approx(1e-2 if in_head else 1e-3), name
        assert group["weight_decay"] == (0.0 if name in norm_names else 0.01), name
    # Biases of linear/conv layers keep weight decay, as in NVlabs/MMSeg.
    assert by_param[id(names["decode_head.classifier.bias"])]["weight_decay"] == 0.01


def test_norms_are_found_by_type_not_by_name():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4))
            self.decode_head = nn.ModuleDict({"mix": nn.Linear(4, 2), "weird_name": nn.LayerNorm(2)})

    net = Net()
    by_param = _groups_by_param(param_groups(net, lr=1.0, weight_decay=0.5, head_lr_mult=3.0))
    assert by_param[id(net.body[1].weight)]["weight_decay"] == 0.0
    head_norm = by_param[id(net.decode_head["weird_name"].bias)]
    assert (head_norm["lr"], head_norm["weight_decay"]) == (3.0, 0.0)
    assert by_param[id(net.decode_head["mix"].weight)]["weight_decay"] == 0.5
    assert by_param[id(net.body[0].weight)]["lr"] == 1.0


def test_frozen_parameters_are_left_out():
    net = nn.Module()
    net.decode_head = nn.Linear(2, 2)
    net.encoder = nn.Linear(2, 2)
    net.encoder.weight.requires_grad_(False)
    params = [p for g in param_groups(net, lr=1.0, weight_decay=0.0) for p in g["params"]]
    assert len(params) == 3 and all(p is not net.encoder.weight for p in params)


def test_build_adamw_uses_the_config_numbers(model):
    optimizer = build_adamw(model, lr=6e-5, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.02)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["name"] == "encoder"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(6e-5)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert optimizer.param_groups[0]["eps"] == 1e-7
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {
        "encoder": 0.02, "encoder_norm": 0.0, "head": 0.02, "head_norm": 0.0
    }
    with pytest.raises(ConfigError, match="optimizer.lr"):
        build_adamw(model, lr=0.0)


def test_warmup_poly_factor_matches_mmcv_formulas():
    # T=100, warmup 10 from ratio 0.1: at step 5 poly = 0.95, warmup scale = 1 - 0.5 * 0.9 = 0.55.
    assert warmup_poly_factor(5, 100, 10, 0.1) == pytest.approx(0.95 * 0.55)
    assert warmup_poly_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_poly_factor(10, 100, 10, 0.1) == pytest.approx(0.9)
    assert warmup_poly_factor(50, 100, 10, 0.1, power=2.0) == pytest.approx(0.25)
    assert warmup_poly_factor(100, 100, 10, 0.1) == 0.0
    assert warmup_poly_factor(150, 100, 10, 0.1) == 0.0  # past the end: stays at the floor
    assert warmup_poly_factor(100, 100, 10, 0.1, min_ratio=0.2) == pytest.approx(0.2)


def test_schedule_steps_every_group_and_keeps_the_head_multiplier(model):
    optimizer = build_adamw(model, lr=1e-3, head_lr_mult=10.0)
    scheduler = build_poly_schedule(optimizer, total_steps=20, warmup_iters=4, warmup_ratio=1e-6, power=1.0)
    seen = []
    for _ in range(20):
        seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    assert seen[0]["encoder"] == pytest.approx(1e-3 * 1e-6 * 1.0)
    assert seen[4]["encoder"] == pytest.approx(1e-3 * (1 - 4 / 20))
    assert seen[19]["encoder"] == pytest.approx(1e-3 * (1 - 19 / 20))
    for step in seen:
        assert step["head"] == pytest.approx(10 * step["encoder"])
        assert step["head_norm"] == pytest.approx(step["head"])
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_min_lr_is_an_absolute_floor_for_every_group(model):
    optimizer = build_adamw(model, lr=1e-3, head_lr_mult=10.0)
    scheduler = build_poly_schedule(optimizer, total_steps=10, warmup_iters=0, min_lr=1e-4)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4] * 4)


def test_schedule_rejects_bad_settings(model):
    optimizer = build_adamw(model)
    with pytest.raises(ConfigError, match="max_steps"):
        build_poly_schedule(optimizer, total_steps=0)
    with pytest.raises(ConfigError, match="warmup_ratio"):
        build_poly_schedule(optimizer, total_steps=10, warmup_ratio=0.0)

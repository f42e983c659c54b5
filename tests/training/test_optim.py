"""Parameter groups (against mmcv's custom_keys rule on NVlabs' parameter names), AdamW and SGD,
and the warmup + poly / cosine schedules."""

import math

import pytest
import torch
from torch import nn

from segformer import SegFormer
from segformer.errors import ConfigError
from segformer.model.checkpoints import map_key
from segformer.training.optim import (
    build_adamw,
    build_cosine_schedule,
    build_poly_schedule,
    build_sgd,
    param_groups,
    warmup_cosine_factor,
    warmup_poly_factor,
)

# NVlabs local_configs/segformer/*: optimizer paramwise_cfg.
NVLABS_CUSTOM_KEYS = {"pos_block": {"decay_mult": 0.0}, "norm": {"decay_mult": 0.0}, "head": {"lr_mult": 10.0}}


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


def _mmcv_multipliers(name: str, custom_keys: dict) -> tuple[float, float]:
    """mmcv 1.x DefaultOptimizerConstructor.add_params: keys sorted by length (longest first),
    ties alphabetically; the first key contained in the parameter's name gives (lr, decay) mults."""
    for key in sorted(sorted(custom_keys), key=len, reverse=True):
        if key in name:
            return custom_keys[key].get("lr_mult", 1.0), custom_keys[key].get("decay_mult", 1.0)
    return 1.0, 1.0


def test_groups_are_nvlabs_mmcv_custom_keys_on_nvlabs_names(model):
    lr, decay = 1e-3, 0.01
    by_param = _groups_by_param(param_groups(model, lr=lr, weight_decay=decay))
    for name, param in model.named_parameters():
        nvlabs = map_key(name, "nvlabs")
        lr_mult, decay_mult = _mmcv_multipliers(nvlabs if isinstance(nvlabs, str) else nvlabs[0], NVLABS_CUSTOM_KEYS)
        group = by_param[id(param)]
        assert (group["lr"], group["weight_decay"]) == pytest.approx((lr * lr_mult, decay * decay_mult)), (name, nvlabs)
    # The case the rule decides: the head's BatchNorm (linear_fuse.bn) gets lr x10 and full decay.
    assert map_key("decode_head.bn.weight", "nvlabs") == "decode_head.linear_fuse.bn.weight"
    head_bn = by_param[id(model.decode_head.bn.weight)]
    assert (head_bn["lr"], head_bn["weight_decay"]) == pytest.approx((1e-2, 0.01))


def test_head_norm_decay_false_treats_the_head_norm_like_the_encoder_norms(model):
    groups = param_groups(model, lr=1e-3, weight_decay=0.01, norm_weight_decay=0.0, head_norm_decay=False)
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
        assert group["lr"] == pytest.approx(1e-2 if name.startswith("decode_head.") else 1e-3), name
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
    by_param = _groups_by_param(param_groups(net, lr=1.0, weight_decay=0.5, head_lr_mult=3.0, head_norm_decay=False))
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
        "encoder": 0.02, "encoder_norm": 0.0, "head": 0.02, "head_norm": 0.02
    }
    with pytest.raises(ConfigError, match="optimizer.lr"):
        build_adamw(model, lr=0.0)


def test_build_sgd_uses_the_same_groups(model):
    optimizer = build_sgd(model, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4, head_norm_decay=False)
    assert isinstance(optimizer, torch.optim.SGD)
    groups = [(g["name"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    expected = [("encoder", 0.01, 5e-4), ("encoder_norm", 0.01, 0.0), ("head", 0.1, 5e-4), ("head_norm", 0.1, 0.0)]
    assert [g[0] for g in groups] == [e[0] for e in expected]
    assert [g[1:] for g in groups] == [pytest.approx(e[1:]) for e in expected]
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in optimizer.param_groups)
    with pytest.raises(ConfigError, match="optimizer.lr"):
        build_sgd(model, lr=-1.0)
    with pytest.raises(ConfigError, match="optimizer.momentum"):
        build_sgd(model, momentum=0.0, nesterov=True)
    with pytest.raises(ConfigError, match="optimizer.momentum"):
        build_sgd(model, momentum=1.5)


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


def test_warmup_cosine_factor_matches_mmcv_formulas():
    # T=100, warmup 10 from ratio 0.1: cosine at step 5 = (1 + cos(pi/20)) / 2, warmup scale 0.55.
    assert warmup_cosine_factor(5, 100, 10, 0.1) == pytest.approx((1 + math.cos(math.pi * 0.05)) / 2 * 0.55)
    assert warmup_cosine_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(50, 100, 10, 0.1) == pytest.approx(0.5)
    assert warmup_cosine_factor(100, 100, 10, 0.1) == pytest.approx(0.0)
    assert warmup_cosine_factor(100, 100, 10, 0.1, min_ratio=0.2) == pytest.approx(0.2)
    assert warmup_cosine_factor(50, 100, 10, 0.1, min_ratio=0.2) == pytest.approx(0.2 + 0.8 * 0.5)


def test_cosine_schedule_curve_at_a_few_steps(model):
    optimizer = build_adamw(model, lr=1e-3, head_lr_mult=10.0)
    scheduler = build_cosine_schedule(optimizer, total_steps=20, warmup_iters=4, warmup_ratio=0.01, min_lr=1e-5)
    seen = []
    for _ in range(21):
        seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()

    def expected(step, base):
        ratio = 1e-5 / base
        cosine = ratio + (1 - ratio) * (1 + math.cos(math.pi * step / 20)) / 2
        return base * cosine * (1 - (1 - step / 4) * 0.99 if step < 4 else 1.0)

    for step in (0, 2, 4, 10, 15, 20):
        assert seen[step]["encoder"] == pytest.approx(expected(step, 1e-3)), step
        assert seen[step]["head"] == pytest.approx(expected(step, 1e-2)), step
    assert seen[20]["encoder"] == seen[20]["head"] == pytest.approx(1e-5)
    with pytest.raises(ConfigError, match="max_steps"):
        build_cosine_schedule(optimizer, total_steps=0)


def test_sgd_and_cosine_configs_build_what_they_say(model, tmp_path):
    from pathlib import Path

    import hydra

    from segformer import cli

    configs = Path(__file__).resolve().parents[2] / "configs"
    # ADE20K: a recipe without its own learning rate (the sample scenes' sets one).
    cfg = cli.compose(configs, "train", ["data=ade20k", "optimizer=sgd", "scheduler=cosine"], run_dir=tmp_path)
    optimizer = hydra.utils.instantiate(cfg.optimizer)(model)
    assert isinstance(optimizer, torch.optim.SGD)
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {
        "encoder": 5e-4, "encoder_norm": 0.0, "head": 5e-4, "head_norm": 5e-4
    }
    assert optimizer.param_groups[0]["momentum"] == 0.9 and not optimizer.param_groups[0]["nesterov"]
    scheduler = hydra.utils.instantiate(cfg.scheduler)(optimizer, 3000)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 1e-6)
    for _ in range(2250):
        optimizer.step()
        scheduler.step()
    # Step 2250 of 3000, past the warmup: cosine at 3/4 of the run.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 + math.cos(math.pi * 0.75)) / 2)

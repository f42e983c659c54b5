"""The paper's optimizer and learning-rate schedule (NVlabs/MMSeg recipe), and alternatives.

AdamW (the paper's) or SGD over parameter groups that give the decode head a larger learning
rate and the encoder's norm layers no weight decay, and a per-iteration schedule: linear warmup
from ``warmup_ratio``, then poly (the paper's) or cosine decay to ``min_lr`` over the whole run.
All are built from ``configs/optimizer`` and ``configs/scheduler`` as Hydra partials and called
by the LightningModule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from segformer.errors import ConfigError

# The norm layers torch ships with parameters: BatchNorm/SyncBatchNorm/InstanceNorm share
# _NormBase; RMSNorm exists from torch 2.4.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    head_lr_mult: float = 10.0,
    norm_weight_decay: float = 0.0,
    head_norm_decay: bool = True,
    head: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters into encoder/head x decay/norm groups (empty groups dropped).

    Norm parameters are found by the type of the module that owns them, so renaming a layer
    cannot silently put weight decay on a norm. ``head`` defaults to ``model.decode_head``.
    ``head_norm_decay`` gives the head's norm (its BatchNorm) the full ``weight_decay``, as NVlabs
    does: mmcv's ``custom_keys`` match ``head`` before ``norm``, and the BN is named
    ``linear_fuse.bn``; False gives it ``norm_weight_decay`` like the encoder's norms.
    """
    head = head if head is not None else getattr(model, "decode_head", None)
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no decode_head; pass the head module explicitly.")
    head_params = {id(p) for p in head.parameters()}
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    groups: dict[str, dict[str, Any]] = {
        "encoder": {"lr": lr, "weight_decay": weight_decay},
        "encoder_norm": {"lr": lr, "weight_decay": norm_weight_decay},
        "head": {"lr": lr * head_lr_mult, "weight_decay": weight_decay},
        "head_norm": {"lr": lr * head_lr_mult, "weight_decay": weight_decay if head_norm_decay else norm_weight_decay},
    }
    for group in groups.values():
        group["params"] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        name = ("head" if id(param) in head_params else "encoder") + ("_norm" if id(param) in norm_params else "")
        groups[name]["params"].append(param)
    return [{"name": name, **group} for name, group in groups.items() if group["params"]]


def _checked_lr(lr: float) -> float:
    if lr <= 0:
        raise ConfigError(f"optimizer.lr must be positive, got {lr}.")
    return lr


def build_adamw(
    model: nn.Module,
    lr: float = 6e-5,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    head_lr_mult: float = 10.0,
    norm_weight_decay: float = 0.0,
    head_norm_decay: bool = True,
) -> AdamW:
    """AdamW over ``param_groups(model, ...)``; the first group is the encoder's (base lr)."""
    groups = param_groups(model, _checked_lr(lr), weight_decay, head_lr_mult, norm_weight_decay, head_norm_decay)
    return AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def build_sgd(
    model: nn.Module,
    lr: float = 0.01,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 5e-4,
    head_lr_mult: float = 10.0,
    norm_weight_decay: float = 0.0,
    head_norm_decay: bool = True,
) -> SGD:
    """SGD with momentum over the same parameter groups as ``build_adamw``."""
    if not 0.0 <= momentum < 1.0 or (nesterov and momentum == 0.0):
        raise ConfigError(f"optimizer.momentum must be in [0, 1) (above 0 with nesterov=true), got {momentum}.")
    groups = param_groups(model, _checked_lr(lr), weight_decay, head_lr_mult, norm_weight_decay, head_norm_decay)
    return SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def _warmup(step: int, warmup_iters: int, warmup_ratio: float) -> float:
    """mmcv's linear warmup: the regular factor times this, from ``warmup_ratio`` to 1."""
    return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio) if step < warmup_iters else 1.0


def warmup_poly_factor(
    step: int,
    total_steps: int,
    warmup_iters: int = 1500,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
    min_ratio: float = 0.0,
) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based), exactly as mmcv computes it.

    Poly: ``(1 - min_ratio) * (1 - step / total_steps) ** power + min_ratio``; during warmup
    that value is scaled by ``1 - (1 - step / warmup_iters) * (1 - warmup_ratio)``, so warmup
    starts at ``warmup_ratio`` times the poly value and joins it at ``warmup_iters``.
    """
    progress = min(step, total_steps) / total_steps
    return ((1.0 - min_ratio) * (1.0 - progress) ** power + min_ratio) * _warmup(step, warmup_iters, warmup_ratio)


def warmup_cosine_factor(
    step: int,
    total_steps: int,
    warmup_iters: int = 1500,
    warmup_ratio: float = 1e-6,
    min_ratio: float = 0.0,
) -> float:
    """Like ``warmup_poly_factor`` with mmcv's cosine annealing in place of poly:
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * step / total_steps)) / 2``."""
    progress = min(step, total_steps) / total_steps
    cosine = min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))
    return cosine * _warmup(step, warmup_iters, warmup_ratio)


def _per_group_schedule(
    optimizer: Optimizer,
    total_steps: int,
    warmup_iters: int,
    warmup_ratio: float,
    min_lr: float,
    factor: Callable[[int, float], float],
) -> LambdaLR:
    """``factor(step, min_ratio)`` per group: ``min_lr`` is absolute, as in mmcv, so each group
    decays to the same floor whatever its lr multiplier."""
    if total_steps < 1:
        raise ConfigError(f"The schedule needs a positive number of steps (trainer.max_steps), got {total_steps}.")
    if warmup_iters < 0 or not 0 < warmup_ratio <= 1:
        raise ConfigError(
            f"scheduler.warmup_iters must be >= 0 and scheduler.warmup_ratio in (0, 1], got "
            f"{warmup_iters} and {warmup_ratio}."
        )

    def factor_for(base_lr: float) -> Callable[[int], float]:
        min_ratio = min(min_lr / base_lr, 1.0)
        return lambda step: factor(step, min_ratio)

    return LambdaLR(optimizer, [factor_for(group["lr"]) for group in optimizer.param_groups])


def build_poly_schedule(
    optimizer: Optimizer,
    total_steps: int,
    warmup_iters: int = 1500,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
    min_lr: float = 0.0,
) -> LambdaLR:
    """Per-step warmup + poly schedule over ``total_steps`` optimizer steps (the paper's)."""

    def factor(step: int, min_ratio: float) -> float:
        return warmup_poly_factor(step, total_steps, warmup_iters, warmup_ratio, power, min_ratio)

    return _per_group_schedule(optimizer, total_steps, warmup_iters, warmup_ratio, min_lr, factor)


def build_cosine_schedule(
    optimizer: Optimizer,
    total_steps: int,
    warmup_iters: int = 1500,
    warmup_ratio: float = 1e-6,
    min_lr: float = 0.0,
) -> LambdaLR:
    """Per-step warmup + cosine decay to ``min_lr`` over ``total_steps`` optimizer steps."""

    def factor(step: int, min_ratio: float) -> float:
        return warmup_cosine_factor(step, total_steps, warmup_iters, warmup_ratio, min_ratio)

    return _per_group_schedule(optimizer, total_steps, warmup_iters, warmup_ratio, min_lr, factor)
